"""Image checks of ``icehpc shards build``: every input decoded under the bomb caps, a PNG's image data
inflated exactly once, faithful conversions to 8-bit grayscale, and the polarity decision."""
from __future__ import annotations

import dataclasses
import io
import warnings
import zlib

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from zlib_ng import zlib_ng  # the same inflate and CRC as zlib, bit for bit, ~1.4× and ~5× faster

from .inputs import Reject


ALLOWED_FORMATS = ("PNG", "JPEG", "TIFF", "BMP", "GIF", "WEBP", "PPM")  # never e.g. EPS (runs Ghostscript)


def _to_gray(im: Image.Image, notes: list[str]) -> Image.Image:
    """Any decoded mode → 8-bit 'L' by a faithful conversion, or :class:`Reject`."""
    mode = im.mode
    if (mode in ("L", "P", "1") and "transparency" in im.info) or mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        notes.append(f"{mode}_alpha_over_white")
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("L")
    if mode == "L":
        return im
    if mode in ("1", "P"):
        notes.append(f"{mode}_to_gray")
        return im.convert("L")
    if mode.startswith("I;16") or mode == "I":
        a = np.asarray(im)
        if a.min() < 0 or a.max() > 65535:
            raise Reject("unsupported_mode", f"{mode} values outside 0..65535")
        # scaled by the bit depth the values actually use (8, 10, 12, 14 or 16 bits), not by the
        # container: 8-bit values in an int32 TIFF or 12-bit data in 16 bits would come out black
        bits = next(b for b in (8, 10, 12, 14, 16) if int(a.max()) < 1 << b)
        if bits == 8:
            notes.append(f"{mode.replace(';', '')}_8bit_values_kept")
            return Image.fromarray(a.astype(np.uint8), "L")
        top = (1 << bits) - 1
        notes.append("16bit_to_8bit" if bits == 16 else f"{bits}bit_in_{mode.replace(';', '')}_to_8bit")
        return Image.fromarray(((a.astype(np.uint32) * 255 + top // 2) // top).astype(np.uint8), "L")
    if mode in ("RGB", "CMYK", "YCbCr", "LAB", "HSV"):
        notes.append(f"{mode}_to_gray")
        return im.convert("RGB").convert("L")
    raise Reject("unsupported_mode", f"image mode {mode} has no faithful 8-bit grayscale conversion")


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # by IHDR colour type
#: Chunks an 8-bit grayscale PNG may hold and still be stored byte-for-byte: every reader (Pillow
#: in the loader included) handles them without decompressing anything. Any other chunk (tRNS,
#: eXIf, acTL, and the compressed zTXt/iTXt/iCCP a decompression bomb hides in) sends the image
#: through Pillow's full decode under its caps and a re-encode.
_PLAIN_CHUNKS = {b"IHDR", b"IDAT", b"IEND", b"gAMA", b"cHRM", b"sRGB", b"pHYs", b"tIME", b"sBIT", b"bKGD", b"tEXt"}
_MAX_PLAIN_TEXT = 1 << 20  # tEXt bytes a plain PNG may carry (Pillow's per-chunk limit, MAX_TEXT_CHUNK)
_IEND = b"\0\0\0\0IEND\xaeB`\x82"


@dataclasses.dataclass
class PngCheck:
    """What :func:`check_png` proved of a PNG: its size, whether it is stored byte-for-byte
    (``plain``), and its inflated (filtered) image data and chunk spans, so that nothing inflates it again."""
    width: int
    height: int
    plain: bool
    raw: bytes
    idat_spans: list[tuple[int, int]]   # (start, end) of each IDAT chunk in the file

    def pixels(self) -> np.ndarray:
        """uint8 [H, W] of a plain PNG: Pillow's C unfilter over the already inflated rows (wrapped in
        a stored, uncompressed zlib stream: a copy, not a second inflate)."""
        im = Image.frombytes("L", (self.width, self.height), zlib.compress(self.raw, 0), "zip", "L")
        return np.frombuffer(im.tobytes(), np.uint8).reshape(self.height, self.width)  # read-only view

    def light_field(self) -> bool:
        """True when row 0 and column 0 of a plain PNG are all light (>= 128), read from the inflated
        rows without unfiltering the rest. Those are w + h - 1 of the 2w + 2h - 4 border pixels, more
        than half, so the border median is light and :func:`dark_border` is False: ``auto`` keeps the
        image without decoding it further. False when it cannot tell (an Avg-filtered row 0 or
        column 0 step, or a dark pixel there)."""
        w, h = self.width, self.height
        if min(w, h) < 3:
            return False
        r = np.frombuffer(self.raw, np.uint8).reshape(h, w + 1)
        f = r[:, 0]
        if f[0] == 3 or (f[1:] == 3).any():  # Avg: a halving recurrence; let the full decode decide
            return False
        # row 0 (no prior row): Sub and Paeth predict from the left pixel, None and Up from nothing
        row0 = np.cumsum(r[0, 1:], dtype=np.uint8) if f[0] in (1, 4) else r[0, 1:]
        if row0.min() < 128:
            return False
        # column 0 (no left pixel): Up and Paeth predict from the pixel above, None and Sub from nothing
        reset = f <= 1
        reset[0] = True
        c = np.cumsum(r[:, 1].astype(np.int64))
        last = np.maximum.accumulate(np.where(reset, np.arange(h), 0))
        col0 = (c - np.where(last > 0, c[last - 1], 0)) & 255
        return int(col0.min()) >= 128

    def stored_idat(self, data: bytes) -> bytes:
        """``data`` with its IDAT chunks replaced by one holding the inflated rows uncompressed:
        the same image to any reader, decoded without inflating the original stream again."""
        z = zlib.compress(self.raw, 0)
        chunk = len(z).to_bytes(4, "big") + b"IDAT" + z + zlib.crc32(b"IDAT" + z).to_bytes(4, "big")
        (first, _), (_, last) = self.idat_spans[0], self.idat_spans[-1]
        between = b"".join(data[e:s] for (_, e), (s, _) in zip(self.idat_spans, self.idat_spans[1:]))
        return data[:first] + chunk + between + data[last:]


def check_png(data: bytes, max_pixels: int) -> PngCheck | None:
    """Structural check of a PNG, inflating its image data exactly once (the caller decodes from it).

    Returns a :class:`PngCheck`: ``plain`` for an 8-bit grayscale, non-interlaced PNG holding only
    :data:`_PLAIN_CHUNKS`. Returns None when ``data`` is not a PNG with a valid IHDR (Pillow then
    decides). Raises :class:`Reject` for a bomb, a bad chunk CRC, truncation, a zlib stream that does
    not end (Adler-32) or inflates to the wrong length, or an invalid row filter: what passes decodes
    in any conforming reader.
    """
    if not data.startswith(PNG_SIGNATURE) or data[12:16] != b"IHDR" or len(data) < 33:
        return None
    w, h = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    depth, colour, compression, filtering, interlace = data[24:29]
    if colour not in _PNG_CHANNELS or compression or filtering or interlace > 1 or not 0 < w * h:
        return None
    if w * h > max_pixels:
        raise Reject("decompression_bomb", f"declares {w}x{h} = {w * h} pixels > max_pixels {max_pixels}")
    pos, n = 8, len(data)
    idat, spans, plain, seen_iend, text = [], [], depth == 8 and colour == 0 and interlace == 0, False, 0
    crc32 = zlib_ng.crc32
    while pos + 12 <= n:
        length = int.from_bytes(data[pos:pos + 4], "big")
        tag, end = data[pos + 4:pos + 8], pos + 12 + length
        if end > n:
            raise Reject("corrupt", f"PNG truncated inside chunk {tag!r}")
        if crc32(data[pos + 4:end - 4]) != int.from_bytes(data[end - 4:end], "big"):
            raise Reject("corrupt", f"PNG chunk {tag!r} fails its CRC")
        if tag == b"IDAT":
            idat.append(data[pos + 8:end - 4])
            spans.append((pos, end))
        elif tag == b"IEND":
            seen_iend = True
            break
        elif tag == b"tEXt":
            text += length
        plain = plain and tag in _PLAIN_CHUNKS
        pos = end
    if not seen_iend or not idat:
        raise Reject("corrupt", "PNG truncated (no IEND)" if not seen_iend else "PNG without IDAT")
    row = 1 + (w * depth * _PNG_CHANNELS[colour] + 7) // 8
    expected = h * row if interlace == 0 else None
    inflater = zlib_ng.decompressobj()
    try:  # bounded output: Adam7 passes add at most a few filter bytes per row
        raw = inflater.decompress(idat[0] if len(idat) == 1 else b"".join(idat), (expected or 2 * h * row + 64) + 1)
    except zlib_ng.error as exc:
        raise Reject("corrupt", f"PNG image data: zlib: {exc}") from None
    if not inflater.eof:
        raise Reject("corrupt", "PNG image data: zlib stream does not end")
    if expected is not None and (len(raw) != expected or max(raw[::row]) > 4):
        raise Reject("corrupt", f"PNG image data: {len(raw)} bytes for {expected} expected, or bad row filters")
    return PngCheck(w, h, plain and text <= _MAX_PLAIN_TEXT, raw, spans)


def dark_border(gray: Image.Image | np.ndarray) -> bool:
    """True when an 'L' image shows a light particle on a dark field: its border (the field) is
    dark (median < 128) and uniform (≥ 90 % of border pixels within 32 levels of the median), and
    something in it is brighter by ≥ 64 levels. Images too small to have an interior, noise, or a
    featureless frame are left alone (``auto`` then keeps them)."""
    a = np.asarray(gray)
    if min(a.shape) < 3:
        return False
    border = np.concatenate([a[0], a[-1], a[1:-1, 0], a[1:-1, -1]])
    if border.min() >= 128:  # a light field (the common case): its median is light too
        return False
    # median of uint8 values by counting (same value as np.median, rounded down like int())
    counts = np.bincount(border, minlength=256)
    cum = np.cumsum(counts)
    m = border.size
    lo = int(np.searchsorted(cum, (m - 1) // 2 + 1))
    hi = int(np.searchsorted(cum, m // 2 + 1))
    level = (lo + hi) // 2
    if level >= 128:
        return False
    near = int(cum[min(255, level + 32)]) - (int(cum[level - 33]) if level >= 33 else 0)
    return near / m >= 0.9 and int(a.max()) - level >= 64  # the same float test as np.mean(...) >= 0.9


def apply_polarity(png: bytes, gray: Image.Image | np.ndarray | None, polarity: str, notes: list[str]) -> bytes:
    """The stored convention is a dark particle on a light field (synthetic CPI data, the canvas
    padding). ``auto`` inverts an image whose border is dark, ``invert`` every image, ``keep`` none;
    an inversion re-encodes the PNG and is listed in ``notes`` (the sample's ``conversion``).
    ``gray``: the decoded pixels of ``png`` (decoded here when None)."""
    if polarity == "keep":
        return png
    if gray is None:
        gray = Image.open(io.BytesIO(png), formats=("PNG",))
        gray.load()
    if polarity == "auto" and not dark_border(gray):
        return png
    notes.append("inverted_auto_dark_border" if polarity == "auto" else "inverted")
    buf = io.BytesIO()
    Image.fromarray(255 - np.asarray(gray.convert("L") if isinstance(gray, Image.Image) else gray), "L").save(
        buf, format="PNG")
    return buf.getvalue()


def _pil_error(exc: Exception) -> Reject:
    """A Pillow failure as a rejection: its own caps (text chunks, ICC profiles) are bombs."""
    text = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, Image.DecompressionBombError) or "too large" in str(exc).lower() \
            or "too much memory" in str(exc).lower():
        return Reject("decompression_bomb", text)
    return Reject("corrupt", text)


def normalise(data: bytes, max_pixels: int, polarity: str = "keep") -> tuple[bytes, int, int, list[str]]:
    """Source bytes → (8-bit grayscale PNG bytes, width, height, conversions applied).

    Every input is fully decoded under the caps, whatever ``polarity``: a PNG's image data is
    inflated once (:func:`check_png`) and unfiltered from that; other formats by Pillow."""
    png = check_png(data, max_pixels)
    if png is not None and png.plain:
        notes: list[str] = []  # already what we store: keep the bytes (and their sha256) unless inverted
        try:  # check_png proved the rows complete and their filters valid: unfiltering cannot fail
            if polarity == "keep" or (polarity == "auto" and png.light_field()):
                out = data
            else:
                out = apply_polarity(data, png.pixels(), polarity, notes)
        except Exception as exc:
            raise Reject("corrupt", f"{type(exc).__name__}: {exc}") from None
        return out, png.width, png.height, notes
    source = data if png is None else png.stored_idat(data)
    try:
        im = Image.open(io.BytesIO(source), formats=ALLOWED_FORMATS)
    except UnidentifiedImageError:
        raise Reject("not_image", f"not a {'/'.join(ALLOWED_FORMATS)} image") from None
    except Exception as exc:  # hostile headers raise anything (SyntaxError, struct.error, ...)
        raise _pil_error(exc) from None
    w, h = im.size
    fmt = im.format
    if w * h > max_pixels:
        raise Reject("decompression_bomb", f"declares {w}x{h} = {w * h} pixels > max_pixels {max_pixels}")
    if w < 1 or h < 1:
        raise Reject("corrupt", f"declares {w}x{h} pixels")
    raw_mode = im.tile[0].args if fmt == "PNG" and im.tile else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. odd EXIF: harmless for the pixels
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im.load()
            orientation = im.getexif().get(0x0112, 1)
    except Exception as exc:
        raise _pil_error(exc) from None
    notes = []
    frames = getattr(im, "n_frames", 1)
    if frames > 1:
        notes.append(f"first_of_{frames}_frames")
    if orientation != 1:
        try:
            im = ImageOps.exif_transpose(im)
        except Exception as exc:
            raise Reject("corrupt", f"EXIF orientation: {type(exc).__name__}: {exc}") from None
        notes.append(f"exif_orientation_{orientation}")
    gray = _to_gray(im, notes)
    notes.insert(0, f"{fmt}_{raw_mode or im.mode}_reencoded")
    buf = io.BytesIO()
    gray.save(buf, format="PNG")
    return apply_polarity(buf.getvalue(), gray, polarity, notes), gray.width, gray.height, notes
