"""Supervised reference for the habit probes: the ceiling the SSL numbers are read against.

The same ViT as an exported iBOT-vMF backbone (architecture, input size, canvas and framing from its
safetensors header), randomly initialised, plus a linear classifier on [CLS], trained WITH labels on
the probe's split-0 training set (stratified 80/20, seed 0, the same classes and rows as
``icehpc probe``) for a fixed wall-clock budget, then scored on the split-0 test set.

    python bench/supervised_reference.py SHARDS --like BACKBONE.safetensors --seconds 300 --out ref.json

Augmentation: random flips and 90° rotations of the framed canvas (habits have no orientation).
AdamW, lr 1e-3, weight decay 0.05, batch 64, label smoothing 0.1, one thread per process.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch


def load_split0(shard_dir: str, canvas: int, framing: str, margin: float, label: str = "habit",
                min_class_count: int = 5):
    """Framed uint8 images [N, 1, C, C], labels [N], classes, (train, test) of the probe's split 0."""
    from icehpc.analysis.probe import stratified_split
    from icehpc.data.loader import ordered_loader, shard_paths

    images, labels = [], []
    for batch, metas in ordered_loader(shard_paths(shard_dir), batch_size=256, canvas=canvas,
                                       framing=framing, margin=margin):
        images.append(batch)
        labels += [str(m.get(label) or "") for m in metas]
    x, labels = torch.cat(images), np.asarray(labels)
    names, counts = np.unique(labels, return_counts=True)
    small = [n for n, c in zip(names, counts) if c < min_class_count or n == ""]
    keep = ~np.isin(labels, small)
    x, labels = x[torch.from_numpy(keep)], labels[keep]
    classes = sorted(set(labels.tolist()))
    y = np.searchsorted(np.asarray(classes), labels)
    train, test = stratified_split(y, 0.2, 0)
    return x, torch.from_numpy(y), classes, train, test


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("shards")
    ap.add_argument("--like", required=True, help="exported backbone whose header gives arch, input, framing")
    ap.add_argument("--seconds", type=float, default=300.0, help="training wall-clock budget (default 300)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)

    from sklearn.metrics import accuracy_score, balanced_accuracy_score

    from icehpc.analysis.embed import eval_transform
    from icehpc.ssl.export import backbone_spec, build_backbone

    spec = backbone_spec(None, None, None, args.seed, like=args.like)
    canvas = spec.canvas or spec.img_size
    x, y, classes, train, test = load_split0(args.shards, canvas, spec.framing, spec.framing_margin)
    vit = build_backbone(spec, args.seed).train()
    head = torch.nn.Linear(vit.embed_dim, len(classes))
    params = list(vit.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    gen = torch.Generator().manual_seed(args.seed)
    train_t = torch.from_numpy(train)
    start, steps = time.perf_counter(), 0
    while time.perf_counter() - start < args.seconds:
        idx = train_t[torch.randint(len(train_t), (64,), generator=gen)]
        xb = x[idx]
        if bool(torch.rand(1, generator=gen) < 0.5):
            xb = xb.flip(-1)
        xb = torch.rot90(xb, int(torch.randint(4, (1,), generator=gen)), dims=(-2, -1))
        logits = head(vit.forward_features(eval_transform(xb, spec.img_size, spec.mean, spec.std, torch.float32))[:, 0])
        loss = loss_fn(logits, y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        steps += 1
    vit.eval()
    preds = []
    with torch.inference_mode():
        for s in range(0, len(test), 256):
            xb = x[torch.from_numpy(test[s:s + 256])]
            preds.append(head(vit.forward_features(eval_transform(xb, spec.img_size, spec.mean, spec.std,
                                                                  torch.float32))[:, 0]).argmax(1))
    pred = torch.cat(preds).numpy()
    truth = y[torch.from_numpy(test)].numpy()
    result = {"shards": args.shards, "like": args.like, "classes": classes, "steps": steps,
              "seconds": time.perf_counter() - start, "n_train": int(len(train)), "n_test": int(len(test)),
              "split": {"seed": 0, "test_fraction": 0.2}, "framing": spec.framing, "canvas": canvas,
              "accuracy": float(accuracy_score(truth, pred)),
              "balanced_accuracy": float(balanced_accuracy_score(truth, pred))}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"supervised reference on {args.shards}: {steps} steps in {result['seconds']:.0f} s, "
          f"accuracy {result['accuracy']:.3f}, balanced {result['balanced_accuracy']:.3f}")


if __name__ == "__main__":
    main()
