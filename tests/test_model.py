"""Backbone with mask token, vMF head, and initialisation from local timm/DINO/iBOT checkpoints."""
from __future__ import annotations

import pickle

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed

from icehpc.ssl.config import ModelConfig
from icehpc.ssl.model import build_model, load_backbone_weights, read_checkpoint

TINY = ModelConfig(arch="vit_small_patch16_224", arch_kwargs={"patch_size": 4, "embed_dim": 32, "depth": 2,
                                                              "num_heads": 2},
                   head_hidden=64, head_bottleneck=16, n_prototypes=40)


def _rgb_vit(img_size: int) -> torch.nn.Module:
    torch.manual_seed(123)
    return timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, img_size=img_size,
                             patch_size=4, embed_dim=32, depth=2, num_heads=2).eval()


def test_forward_shapes_and_normalised_bottleneck():
    torch.manual_seed(0)
    model = build_model(TINY, img_size=32)
    g, loc = torch.randn(6, 1, 32, 32), torch.randn(9, 1, 16, 16)
    masks = torch.rand(6, 64) < 0.3
    out = model(g, masks, loc)
    assert out.cls_z.shape == (15, 16) and out.patch_z.shape == (int(masks.sum()), 16)
    assert out.cls_prototypes.shape == (40, 16) and out.patch_prototypes is out.cls_prototypes
    torch.testing.assert_close(out.cls_z.norm(dim=1), torch.ones(15))
    assert model.prototype_names() == ["head.prototype_v", "head.prototype_g"]
    separate = build_model(ModelConfig(**{**TINY.__dict__, "shared_head": False}), img_size=32)
    assert separate.prototype_names() == ["head.prototype_v", "head.prototype_g", "patch_head.prototype_v",
                                          "patch_head.prototype_g"]
    plain = build_model(ModelConfig(**{**TINY.__dict__, "prototype_param": "plain"}), img_size=32)
    assert plain.prototype_names() == ["head.prototypes_plain"]


def test_weight_normalised_prototypes_keep_their_norm_out_of_weight_decay():
    """w_k = g_k·v_k/‖v_k‖ (the reference head): decaying v leaves w unchanged, and g (= κτ) sits
    in its own optimiser group without weight decay, frozen with the prototypes at first."""
    from icehpc.ssl.engine import apply_schedule, param_groups
    from icehpc.ssl.schedule import Schedule

    torch.manual_seed(0)
    model = build_model(ModelConfig(**{**TINY.__dict__, "prototype_init_norm": 1.5}), img_size=32)
    head = model.head
    torch.testing.assert_close(head.prototypes.norm(dim=1), torch.full((40,), 1.5))
    before = head.prototypes.detach().clone()
    with torch.no_grad():
        head.prototype_v.mul_(0.3)  # what weight decay does to v
    torch.testing.assert_close(head.prototypes, before)
    groups = {g["name"]: g for g in param_groups(model)}
    assert [id(p) for p in groups["prototype_norms"]["params"]] == [id(head.prototype_g)]
    opt = torch.optim.AdamW(list(groups.values()), lr=1.0)
    apply_schedule(opt, Schedule(lr=0.1, weight_decay=0.2, momentum=0.99, teacher_temp=0.04, last_layer_frozen=True))
    by_name = {g["name"]: g for g in opt.param_groups}
    assert by_name["prototype_norms"]["weight_decay"] == 0.0 and by_name["prototypes"]["weight_decay"] == 0.2
    assert by_name["prototype_norms"]["lr"] == 0.0 == by_name["prototypes"]["lr"] and by_name["decay"]["lr"] == 0.1


def test_mask_token_replaces_patch_embeddings():
    torch.manual_seed(0)
    backbone = build_model(TINY, img_size=32).backbone.eval()
    with torch.no_grad():
        backbone.mask_token.normal_()
    a, b = torch.randn(1, 1, 32, 32), torch.randn(1, 1, 32, 32)
    full = torch.ones(1, 64, dtype=torch.bool)
    # every patch masked: the image no longer matters
    torch.testing.assert_close(backbone(a, full), backbone(b, full))
    # no patch masked: same as no mask at all, and the images differ
    none = torch.zeros(1, 64, dtype=torch.bool)
    torch.testing.assert_close(backbone(a, none), backbone(a))
    assert not torch.allclose(backbone(a), backbone(b))


def test_gradients_reach_the_prototypes_and_the_mask_token():
    model = build_model(TINY, img_size=32)
    out = model(torch.randn(2, 1, 32, 32), torch.rand(2, 64) < 0.5, torch.randn(2, 1, 16, 16))
    logits = torch.cat([out.cls_z, out.patch_z]) @ out.cls_prototypes.T
    logits.logsumexp(1).sum().backward()
    assert model.head.prototype_v.grad is not None and model.head.prototype_v.grad.abs().sum() > 0
    assert model.head.prototype_g.grad is not None and model.head.prototype_g.grad.abs().sum() > 0
    assert model.backbone.mask_token.grad.abs().sum() > 0


def test_grayscale_fold_equals_rgb_model_on_replicated_gray(tmp_path):
    rgb = _rgb_vit(32)
    path = tmp_path / "timm.pth"
    torch.save(rgb.state_dict(), path)
    model = build_model(TINY, img_size=32)
    load_backbone_weights(model.backbone, path)
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.backbone.vit.eval()(x), rgb(x.expand(-1, 3, -1, -1)), atol=1e-5, rtol=1e-4)


def test_dino_layout_with_position_embedding_resampling(tmp_path):
    rgb = _rgb_vit(64)  # 16×16 grid in the file, 8×8 in the model
    full_ckpt = {"teacher": {f"backbone.{k}": v for k, v in rgb.state_dict().items()}
                 | {"head.mlp.0.weight": torch.zeros(3, 3)}, "epoch": 99}
    path = tmp_path / "dino_full.pth"
    torch.save(full_ckpt, path)
    model = build_model(TINY, img_size=32)
    loaded = load_backbone_weights(model.backbone, path)
    vit = model.backbone.vit
    expected = resample_abs_pos_embed(rgb.pos_embed.detach(), new_size=(8, 8), old_size=(16, 16), num_prefix_tokens=1)
    torch.testing.assert_close(vit.pos_embed.detach(), expected)
    torch.testing.assert_close(vit.patch_embed.proj.weight.detach(), rgb.patch_embed.proj.weight.detach().sum(1, keepdim=True))
    torch.testing.assert_close(vit.blocks[1].mlp.fc2.weight, rgb.blocks[1].mlp.fc2.weight)
    assert "mask_token" not in loaded


def test_ibot_safetensors_with_module_prefix_brings_the_mask_token(tmp_path):
    rgb = _rgb_vit(32)
    tensors = {f"module.backbone.{k}": v.contiguous() for k, v in rgb.state_dict().items()}
    tensors["module.backbone.masked_embed"] = torch.full((1, 32), 0.5)
    path = tmp_path / "ibot.safetensors"
    save_file(tensors, str(path))
    model = build_model(TINY, img_size=32)
    loaded = load_backbone_weights(model.backbone, path)
    assert "mask_token" in loaded
    torch.testing.assert_close(model.backbone.mask_token.detach(), torch.full((32,), 0.5))


def test_bad_checkpoints_give_clear_errors(tmp_path):
    model = build_model(TINY, img_size=32)
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        load_backbone_weights(model.backbone, tmp_path / "absent.pth")
    partial = {k: v for k, v in _rgb_vit(32).state_dict().items() if not k.startswith("blocks.1.")}
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match="missing .*blocks.1"):
        load_backbone_weights(model.backbone, tmp_path / "partial.pth")
    wide = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, img_size=32, patch_size=4,
                             embed_dim=48, depth=2, num_heads=2)
    torch.save(wide.state_dict(), tmp_path / "wide.pth")
    with pytest.raises(ValueError, match="shape mismatch"):
        load_backbone_weights(model.backbone, tmp_path / "wide.pth")


class _Payload:
    """Any pickled object that is not a tensor container: weights_only must refuse to build it."""


def test_checkpoints_are_loaded_weights_only(tmp_path):
    torch.save({"state_dict": _rgb_vit(32).state_dict(), "evil": _Payload()}, tmp_path / "unsafe.pth")
    with pytest.raises(pickle.UnpicklingError):
        read_checkpoint(tmp_path / "unsafe.pth")


def test_a_model_too_big_for_any_machine_is_refused_before_anything_is_allocated():
    """model.arch_kwargs is free-form: `{embed_dim: 100000000}` must be one config error, counted on
    the meta device (no memory), and timm's own refusals are one line naming the keys too."""
    import resource

    from icehpc.config import ConfigError
    from icehpc.ssl.config import ModelConfig
    from icehpc.ssl.model import check_model_size

    tiny = ModelConfig(arch_kwargs={"embed_dim": 32, "depth": 1, "num_heads": 2, "patch_size": 8},
                       head_hidden=32, head_bottleneck=16, n_prototypes=32)
    assert 0 < check_model_size(tiny, 32) < 10**6
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    huge = ModelConfig(arch_kwargs={"embed_dim": 100_000_000, "depth": 2, "num_heads": 2})
    with pytest.raises(ConfigError, match="exceed the limit"):
        check_model_size(huge, 224)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 500_000  # KiB: nothing near 10¹⁷ floats
    with pytest.raises(ConfigError, match="timm cannot build"):
        check_model_size(ModelConfig(arch_kwargs={"embed_dim": 30, "num_heads": 7}), 224)
