"""A third embedded image-text benchmark with real, human-written captions: emoji and their Unicode CLDR names.

Images are rendered from Debian's ``fonts-noto-color-emoji`` (Noto Color Emoji, a CBDT colour bitmap font that
Pillow draws at its one supported size, 109) centred on a plain background and resized (LANCZOS) to
``image_size``. Captions are the Unicode CLDR short names that the PyPI package ``emoji`` lists for every
fully-qualified emoji (``":woman_technologist_medium_skin_tone:"`` -> ``"woman technologist, medium skin
tone"``); ``alt_captions`` holds the other names of the same emoji (the package's aliases and, for a single code
point, its Unicode character name). Emoji the font cannot draw (newer than the font: a blank image, or a
sequence it has no ligature for, drawn as several glyphs) are skipped and counted.

Groups: the skin-tone, gender, hair-style and direction variants of one base emoji (all of "technologist", "man
technologist", "woman technologist: dark skin tone", ...) form one group, see :func:`emoji_group_key`; ``label``
is the group id (``ClassLabel`` named after the group's neutral member, e.g. "technologist"). The groups are split
70/10/20 into train/validation/test with ``seed``, so no group (and no near-duplicate variant) spans two splits and
the validation/test classes are unseen in training. Rows of a split are in a seeded random order.

The built dataset is cached under ``HF_DATASETS_CACHE/hf_mmsel`` keyed by the font file's SHA-256, the ``emoji``
package version, the image size, background, seed and ``max_groups`` (a cold full build renders ~3,800 emoji).
"""

from __future__ import annotations

import functools
import glob
import hashlib
import io
import json
import logging
import os
import re
import shutil
import subprocess
import unicodedata
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from datasets import DatasetDict
    from PIL import Image as PILImage
    from PIL import ImageFont

logger = logging.getLogger(__name__)

#: The Debian package that ships the font, and the command that installs it.
EMOJI_FONT_PACKAGE = "fonts-noto-color-emoji"
EMOJI_FONT_INSTALL_COMMAND = f"apt-get update && apt-get install -y {EMOJI_FONT_PACKAGE}"
#: Where the font is looked for first (``font_path=`` or the ``HF_MMSEL_EMOJI_FONT`` variable take precedence).
EMOJI_FONT_CANDIDATES: tuple[str, ...] = (
    "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf",
    "/usr/share/fonts/noto/NotoColorEmoji.ttf",
    "/usr/share/fonts/google-noto-emoji/NotoColorEmoji.ttf",
    "/usr/share/fonts/truetype/NotoColorEmoji.ttf",
)
_FONT_GLOBS = (
    "/usr/share/fonts/**/NotoColorEmoji*.ttf",
    "/usr/local/share/fonts/**/NotoColorEmoji*.ttf",
    "~/.local/share/fonts/**/NotoColorEmoji*.ttf",
    "~/.fonts/**/NotoColorEmoji*.ttf",
)
#: The only pixel size a CBDT bitmap font such as Noto Color Emoji can be opened at.
EMOJI_FONT_SIZE = 109

#: Free border around the glyph, as a fraction of the image side (each side).
EMOJI_MARGIN = 0.08

#: Fractions of the groups in the held-out splits; train gets the rest (70%).
EMOJI_SPLIT_FRACTIONS: dict[str, float] = {"test": 0.2, "validation": 0.1}

#: Skin-tone modifiers (Fitzpatrick types) U+1F3FB..U+1F3FF and their CLDR names.
SKIN_TONES: dict[int, str] = {
    0x1F3FB: "light skin tone",
    0x1F3FC: "medium-light skin tone",
    0x1F3FD: "medium skin tone",
    0x1F3FE: "medium-dark skin tone",
    0x1F3FF: "dark skin tone",
}

# Bump when rendering, captions, grouping or the stored layout change: old caches are then ignored.
_CACHE_VERSION = "v1"

_ZWJ = 0x200D
_VS16 = 0xFE0F
# ZWJ-joined components that only make a variant of the emoji before them: female/male sign, "facing right"
# arrow (Emoji 15.1), and the hair components red/curly/bald/white hair.
_VARIANT_COMPONENTS = {0x2640, 0x2642, 0x27A1, 0x1F9B0, 0x1F9B1, 0x1F9B2, 0x1F9B3}
# gendered code points -> their gender-neutral counterpart
_NEUTRAL_CODEPOINTS = {
    0x1F468: 0x1F9D1,  # man -> person
    0x1F469: 0x1F9D1,  # woman -> person
    0x1F466: 0x1F9D2,  # boy -> child
    0x1F467: 0x1F9D2,  # girl -> child
    0x1F474: 0x1F9D3,  # old man -> older person
    0x1F475: 0x1F9D3,  # old woman -> older person
    0x1F934: 0x1FAC5,  # prince -> person with crown
    0x1F478: 0x1FAC5,  # princess -> person with crown
    0x1F930: 0x1FAC4,  # pregnant woman -> pregnant person
    0x1FAC3: 0x1FAC4,  # pregnant man -> pregnant person
    0x1F57A: 0x1F483,  # man dancing -> woman dancing (no neutral form)
}
# single code points that have a gender-neutral ZWJ sequence form (key -> key)
_KEY_ALIASES = {
    "1F385": "1F9D1-200D-1F384",  # Santa Claus -> Mx Claus
    "1F936": "1F9D1-200D-1F384",  # Mrs. Claus -> Mx Claus
    "1F48F": "1F9D1-200D-2764-200D-1F48B-200D-1F9D1",  # kiss -> kiss: person, person
    "1F491": "1F9D1-200D-2764-200D-1F9D1",  # couple with heart -> couple with heart: person, person
    "1F46B": "1F9D1-200D-1F91D-200D-1F9D1",  # woman and man holding hands -> people holding hands
    "1F46C": "1F9D1-200D-1F91D-200D-1F9D1",  # men holding hands
    "1F46D": "1F9D1-200D-1F91D-200D-1F9D1",  # women holding hands
    "1F91D": "1FAF1-200D-1FAF2",  # handshake -> rightwards hand + leftwards hand (its skin-tone form)
    "1F46A": "1F9D1-200D-1F9D1-200D-1F9D2",  # family -> family: adult, adult, child
}

_TONE_RE = re.compile(r"\s*\b((?:medium-light|medium-dark|light|medium|dark) skin tone)\b")
_PEOPLE = {"man", "woman", "person", "boy", "girl", "child", "adult"}
_ATTRIBUTE_RE = re.compile(r"^(person|man|woman) (red hair|curly hair|white hair|bald|blond hair|beard)$")
_LIST_PREFIXES = ("couple with heart", "kiss", "family")


class EmojiFontNotFoundError(FileNotFoundError):
    """The Noto Color Emoji font is not installed (Debian package ``fonts-noto-color-emoji``)."""


# ------------------------------------------------------------------------------------------------ font lookup
def find_emoji_font(font_path: str | os.PathLike | None = None) -> Path:
    """Path of the Noto Color Emoji font: ``font_path``, else ``$HF_MMSEL_EMOJI_FONT``, else the usual Debian /
    Fedora locations, a glob under the font folders, and ``fc-list``.

    Raises :class:`EmojiFontNotFoundError` naming the Debian package and its install command if none exists.
    """
    explicit = font_path if font_path is not None else os.environ.get("HF_MMSEL_EMOJI_FONT") or None
    if explicit is not None:
        path = Path(explicit).expanduser()
        if path.is_file():
            return path
        raise EmojiFontNotFoundError(
            f"emoji font {str(path)!r} does not exist; install the Debian package {EMOJI_FONT_PACKAGE} "
            f"({EMOJI_FONT_INSTALL_COMMAND}) and pass its NotoColorEmoji.ttf, or leave font_path unset"
        )
    for candidate in EMOJI_FONT_CANDIDATES:
        if Path(candidate).is_file():
            return Path(candidate)
    for pattern in _FONT_GLOBS:
        found = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
        if found:
            return Path(found[0])
    fc_list = shutil.which("fc-list")
    if fc_list:
        try:
            listed = subprocess.run([fc_list, ":family=Noto Color Emoji", "file"], capture_output=True, text=True,
                                    timeout=30, check=False).stdout
        except (OSError, subprocess.SubprocessError):
            listed = ""
        for line in listed.splitlines():
            path = Path(line.strip().rstrip(":"))
            if path.suffix.lower() == ".ttf" and path.is_file():
                return path
    raise EmojiFontNotFoundError(
        f"the Noto Color Emoji font (NotoColorEmoji.ttf) was not found in {', '.join(EMOJI_FONT_CANDIDATES[:1])}, "
        f"under /usr/share/fonts or by fc-list; the 'emoji' dataset renders its images with it. Install the Debian "
        f"package {EMOJI_FONT_PACKAGE}: `{EMOJI_FONT_INSTALL_COMMAND}` (as root), or point HF_MMSEL_EMOJI_FONT / "
        "font_path= at a NotoColorEmoji.ttf"
    )


def _has_raqm() -> bool:
    from PIL import features

    return bool(features.check("raqm"))


def open_emoji_font(font_path: str | os.PathLike | None = None) -> ImageFont.FreeTypeFont:
    """The emoji font at :data:`EMOJI_FONT_SIZE`, with the Raqm (HarfBuzz) layout when Pillow has it.

    Without Raqm (Pillow's wheels need the system's libfribidi: Debian ``libfribidi0``) ZWJ, skin-tone and flag
    sequences are drawn as separate glyphs, and :func:`render_emoji` skips them: a warning says so.
    """
    from PIL import ImageFont

    path = find_emoji_font(font_path)
    if _has_raqm():
        layout = ImageFont.Layout.RAQM
    else:
        warnings.warn(
            "Pillow's Raqm text layout is unavailable (install libfribidi: `apt-get install -y libfribidi0`): "
            "emoji sequences (skin tones, ZWJ sequences, flags) cannot be drawn and are skipped",
            RuntimeWarning, stacklevel=2,
        )
        layout = ImageFont.Layout.BASIC
    return ImageFont.truetype(str(path), EMOJI_FONT_SIZE, layout_engine=layout)


# ------------------------------------------------------------------------------------ captions and groups
def _codepoints(text: str) -> list[int]:
    return [ord(ch) for ch in text]


def emoji_codepoints(text: str) -> str:
    """``"U+1F469 U+200D U+1F4BB"`` for 👩‍💻."""
    return " ".join(f"U+{cp:04X}" for cp in _codepoints(text))


def emoji_group_key(text: str) -> str:
    """The group of an emoji: its code points with the variant parts removed, as ``"1F9D1-200D-1F4BB"``.

    Removed: skin-tone modifiers U+1F3FB..U+1F3FF, the emoji presentation selector U+FE0F, ZWJ-joined gender signs
    ♀/♂ (U+2640/U+2642), hair components (U+1F9B0..U+1F9B3) and the "facing right" arrow (U+27A1); then man /
    woman (and boy/girl, old man/old woman, prince/princess, ...) become their gender-neutral code point, and a
    few single code points become their neutral ZWJ form (💏 kiss -> kiss: person, person; 🤝 -> 🫱‍🫲; 🎅/🤶 -> 🧑‍🎄).
    So 🧑‍💻, 👨‍💻 and 👩🏽‍💻 share the key of "technologist"; 👍 and 👍🏿 share one; 😀 and 😃 do not.
    """
    cps = [cp for cp in _codepoints(text) if cp != _VS16 and cp not in SKIN_TONES]
    parts: list[list[int]] = [[]]
    for cp in cps:
        if cp == _ZWJ:
            parts.append([])
        else:
            parts[-1].append(cp)
    parts = [part for part in parts if part]
    kept = [part for part in parts if not (len(part) == 1 and part[0] in _VARIANT_COMPONENTS)]
    if kept and len(kept) < len(parts):
        parts = kept
    key = "-200D-".join("-".join(f"{_NEUTRAL_CODEPOINTS.get(cp, cp):X}" for cp in part) for part in parts)
    return _KEY_ALIASES.get(key, key)


def _is_flag(text: str) -> bool:
    cps = [cp for cp in _codepoints(text) if cp != _VS16]
    regional = len(cps) == 2 and all(0x1F1E6 <= cp <= 0x1F1FF for cp in cps)
    tagged = len(cps) > 2 and cps[0] == 0x1F3F4 and all(0xE0020 <= cp <= 0xE007F for cp in cps[1:])
    return regional or tagged


def _plain_name(shortcode: str) -> str:
    return re.sub(r"\s+", " ", shortcode.strip(":").replace("_", " ")).strip()


def emoji_caption(text: str) -> str:
    """The readable CLDR short name of a fully-qualified emoji, from the ``emoji`` package.

    ``":grinning_face:"`` -> ``"grinning face"``; CLDR's "name: qualifier" becomes "name, qualifier":
    "woman technologist, medium skin tone", "kiss, woman, man", "man, red hair"; flags read "flag of France".
    """
    import emoji

    data = emoji.EMOJI_DATA.get(text)
    if data is None:
        raise KeyError(f"{text!r} ({emoji_codepoints(text)}) is not an emoji known to the emoji package")
    name = _plain_name(data["en"])
    if _is_flag(text):
        return f"flag of {name}"
    tones = _TONE_RE.findall(name)
    name = re.sub(r"\s+", " ", _TONE_RE.sub("", name)).strip()
    attribute = _ATTRIBUTE_RE.match(name)
    if attribute:
        name = f"{attribute.group(1)}, {attribute.group(2)}"
    else:
        for prefix in _LIST_PREFIXES:
            rest = name[len(prefix):].split()
            if name.startswith(prefix + " ") and rest and set(rest) <= _PEOPLE:
                name = ", ".join([prefix, *rest])
                break
    return ", ".join([name, *tones])


def _normalized(text: str) -> str:
    return re.sub(r"[^0-9a-z]+", "", text.lower())


def emoji_alt_captions(text: str) -> list[str]:
    """Other names of an emoji: the ``emoji`` package's aliases (``":grinning:"``) and, for a single code point,
    its Unicode character name lower-cased; names equal to the caption or shorter than 3 characters dropped."""
    import emoji

    data = emoji.EMOJI_DATA[text]
    names = [_plain_name(alias) for alias in data.get("alias", [])]
    cps = [cp for cp in _codepoints(text) if cp != _VS16]
    if len(cps) == 1:
        try:
            names.append(unicodedata.name(chr(cps[0])).lower())
        except ValueError:  # newer than this Python's Unicode database
            pass
    seen = {_normalized(emoji_caption(text))}
    out = []
    for name in names:
        if len(name) >= 3 and _normalized(name) not in seen:
            seen.add(_normalized(name))
            out.append(name)
    return out


def fully_qualified_emoji() -> list[str]:
    """Every fully-qualified emoji of the installed ``emoji`` package, sorted by code points."""
    import emoji

    status = emoji.STATUS["fully_qualified"]
    return sorted((e for e, d in emoji.EMOJI_DATA.items() if d["status"] == status), key=_codepoints)


# ---------------------------------------------------------------------------------------------- rendering
def _background_rgb(background: str | Sequence[int]) -> tuple[int, int, int]:
    from PIL import ImageColor

    rgb = ImageColor.getrgb(background) if isinstance(background, str) else tuple(int(v) for v in background)
    if len(rgb) < 3 or not all(0 <= v <= 255 for v in rgb[:3]):
        raise ValueError(f"background must be a colour name or an RGB triple, got {background!r}")
    return (int(rgb[0]), int(rgb[1]), int(rgb[2]))


@functools.lru_cache(maxsize=8)
def _one_glyph_width(font: ImageFont.FreeTypeFont) -> int:
    left, _, right, _ = font.getbbox("\U0001F600")  # grinning face: one glyph in every Noto Color Emoji
    return right - left


def _drawn_text(text: str, font: ImageFont.FreeTypeFont) -> str:
    from PIL import ImageFont

    # without Raqm the presentation selector U+FE0F would be laid out as a glyph of its own
    return text.replace("\ufe0f", "") if font.layout_engine == ImageFont.Layout.BASIC else text


def _glyph_box(text: str, font: ImageFont.FreeTypeFont) -> tuple[int, int, int, int] | None:
    left, top, right, bottom = font.getbbox(_drawn_text(text, font))
    if right <= left or bottom <= top or right - left > 1.5 * _one_glyph_width(font):
        return None
    return left, top, right, bottom


def emoji_is_drawable(text: str, font: ImageFont.FreeTypeFont) -> bool:
    """Whether the font has one non-empty glyph for ``text`` (no rendering: its laid-out bounding box).

    An emoji newer than the font has an empty box (no bitmap); a sequence without a ligature in the font is
    laid out as several glyphs, wider than one emoji."""
    return _glyph_box(text, font) is not None


def _draw(text: str, font: ImageFont.FreeTypeFont, box: tuple[int, int, int, int], image_size: int,
          bg: tuple[int, int, int], margin: float) -> PILImage.Image | None:
    from PIL import Image, ImageDraw

    left, top, right, bottom = box
    width, height = right - left, bottom - top
    side = int(round(max(width, height) / (1 - 2 * margin)))
    glyph = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    ImageDraw.Draw(glyph).text(((side - width) // 2 - left, (side - height) // 2 - top), _drawn_text(text, font),
                               font=font, embedded_color=True)
    canvas = Image.new("RGBA", (side, side), (*bg, 255))
    canvas.alpha_composite(glyph)
    image = canvas.convert("RGB").resize((image_size, image_size), Image.LANCZOS)
    if not np.any(np.asarray(image) != np.asarray(bg, dtype=np.uint8)):  # nothing drawn: skip it
        return None
    return image


def render_emoji(
    text: str,
    font: ImageFont.FreeTypeFont | None = None,
    *,
    image_size: int = 64,
    background: str | Sequence[int] = "white",
    margin: float = EMOJI_MARGIN,
) -> PILImage.Image | None:
    """Draw one emoji centred on a square ``background`` (``margin`` of the side left free on each side),
    resized (LANCZOS) to ``image_size``; an RGB PIL image, or ``None`` if the font cannot draw it (an empty
    glyph or an all-background image, or a sequence it has no single glyph for and would draw as several)."""
    font = open_emoji_font() if font is None else font
    box = _glyph_box(text, font)
    return None if box is None else _draw(text, font, box, image_size, _background_rgb(background), margin)


def _png(image: PILImage.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# ----------------------------------------------------------------------------------------------- building
def _group_name(members: list[str], key: str) -> str:
    """The caption of the group's neutral member (its code points are the key), else its shortest caption."""
    neutral = [m for m in members if "-".join(f"{cp:X}" for cp in _codepoints(m) if cp != _VS16) == key]
    return emoji_caption(min(neutral or members, key=lambda m: (len(emoji_caption(m)), _codepoints(m))))


def split_emoji_groups(
    sizes: Sequence[int], rng: np.random.Generator, max_groups: int | None = None
) -> dict[str, list[int]]:
    """Deal group indices to train/validation/test, 70/10/20 of the groups, stratified by group size.

    ``max_groups`` groups are drawn at random (all by default) and sorted by size (random order among equal
    sizes); each run of 10 consecutive groups is dealt to the splits in a shuffled 7/1/2 pattern, so the pairs
    (a group has 1 to ~100 variants) split about 70/10/20 too. Every split gets at least one group.
    """
    sizes = np.asarray(sizes)
    order = rng.permutation(len(sizes))
    if max_groups is not None:
        order = order[:max_groups]
    order = order[np.argsort(-sizes[order], kind="stable")]
    n_test = int(round(10 * EMOJI_SPLIT_FRACTIONS["test"]))
    n_val = int(round(10 * EMOJI_SPLIT_FRACTIONS["validation"]))
    pattern = np.array(["test"] * n_test + ["validation"] * n_val + ["train"] * (10 - n_test - n_val))
    dealt = np.concatenate([rng.permutation(pattern) for _ in range(-(-len(order) // 10))])[:len(order)]
    out = {split: [int(i) for i, d in zip(order, dealt) if d == split] for split in ("train", "validation", "test")}
    for split in out:  # a tiny subset: move the smallest group of the largest split
        if not out[split]:
            donor = max(out, key=lambda s: len(out[s]))
            if len(out[donor]) > 1:
                out[split].append(out[donor].pop())
    return out


def _build(
    font_path: Path, image_size: int, background: tuple[int, int, int], seed: int, max_groups: int | None
) -> DatasetDict:
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, Sequence, Value

    font = open_emoji_font(font_path)
    candidates = fully_qualified_emoji()
    boxes = {text: _glyph_box(text, font) for text in candidates}
    drawable = [text for text in candidates if boxes[text] is not None]
    skipped = [text for text in candidates if boxes[text] is None]
    by_key: dict[str, list[str]] = {}
    for text in drawable:
        by_key.setdefault(emoji_group_key(text), []).append(text)
    keys = sorted(by_key, key=lambda k: [int(p, 16) for p in k.split("-")])
    rng = np.random.default_rng(seed)
    split_groups = split_emoji_groups([len(by_key[k]) for k in keys], rng, max_groups)
    chosen = sorted(int(i) for g in split_groups.values() for i in g)  # label: rank among the kept groups
    label_of = {keys[i]: label for label, i in enumerate(chosen)}

    rendered: dict[str, list[tuple[str, bytes]]] = {}  # group key -> (emoji, PNG)
    for i in chosen:
        for text in by_key[keys[i]]:
            image = _draw(text, font, boxes[text], image_size, background, EMOJI_MARGIN)
            if image is None:
                skipped.append(text)
            else:
                rendered.setdefault(keys[i], []).append((text, _png(image)))
    names, used = [], set()
    for i in chosen:
        name = _group_name(by_key[keys[i]], keys[i])
        name = name if name not in used else f"{name} ({keys[i]})"
        used.add(name)
        names.append(name)

    import emoji as emoji_pkg

    n_rows = sum(len(v) for v in rendered.values())
    description = (
        f"Noto Color Emoji ({font_path.name}) rendered at {image_size}x{image_size} with CLDR-name captions from "
        f"emoji {emoji_pkg.__version__}: of {len(candidates)} fully-qualified emoji {len(skipped)} were skipped "
        f"(the font cannot draw them); {n_rows} pairs in {len(chosen)} groups."
    )
    logger.info(description)
    features = Features({
        "image": Image(), "caption": Value("string"), "label": ClassLabel(names=names),
        "emoji": Value("string"), "codepoints": Value("string"), "alt_captions": Sequence(Value("string")),
        "sample_idx": Value("int64"),
    })
    out = DatasetDict()
    for split, group_idx in split_groups.items():
        rows = [(keys[i], text, png) for i in sorted(int(g) for g in group_idx) for text, png in
                rendered.get(keys[i], [])]
        rows = [rows[j] for j in rng.permutation(len(rows))]
        out[split] = Dataset.from_dict(
            {
                "image": [{"bytes": png, "path": f"emoji/{key}/{'-'.join(f'{cp:X}' for cp in _codepoints(text))}.png"}
                          for key, text, png in rows],
                "caption": [emoji_caption(text) for _, text, _ in rows],
                "label": [label_of[key] for key, _, _ in rows],
                "emoji": [text for _, text, _ in rows],
                "codepoints": [emoji_codepoints(text) for _, text, _ in rows],
                "alt_captions": [emoji_alt_captions(text) for _, text, _ in rows],
                "sample_idx": list(range(len(rows))),
            },
            features=features, split=split,
        )
        out[split].info.description = description  # kept by save_to_disk: the skip count survives the cache
    return out


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def emoji_cache_dir(
    font_path: Path, image_size: int, background: tuple[int, int, int], seed: int, max_groups: int | None
) -> Path:
    """``HF_DATASETS_CACHE/hf_mmsel/emoji_captions_<version>_<key>``; the key hashes the font file, the ``emoji``
    package version, Python's Unicode database version, the Raqm availability and the build arguments."""
    import emoji
    from datasets import config

    fingerprint = [_CACHE_VERSION, _file_sha256(font_path), emoji.__version__, unicodedata.unidata_version,
                   _has_raqm(), image_size, list(background), seed, max_groups]
    key = hashlib.sha1(json.dumps(fingerprint).encode()).hexdigest()[:16]
    return Path(config.HF_DATASETS_CACHE) / "hf_mmsel" / f"emoji_captions_{_CACHE_VERSION}_{key}"


def load_emoji_captions(
    *,
    image_size: int = 64,
    background: str | Sequence[int] = "white",
    seed: int = 0,
    max_groups: int | None = None,
    font_path: str | os.PathLike | None = None,
    cache: bool = True,
) -> DatasetDict:
    """Emoji rendered from Noto Color Emoji with their CLDR names as captions, ``DatasetDict(train, validation,
    test)`` split by emoji group (see the module docstring).

    Columns: ``image`` (PIL, ``image_size`` x ``image_size`` RGB), ``caption`` (str, e.g. "grinning face",
    "woman technologist, medium skin tone"), ``label`` (ClassLabel over the groups, named after each group's
    neutral member), ``emoji`` (the emoji string), ``codepoints`` ("U+1F600"), ``alt_captions`` (list of str:
    aliases and Unicode names, possibly empty), ``sample_idx`` (int64, 0..N-1 per split). With Debian 12's font and
    emoji 2.16: 3,789 pairs in 1,679 groups (174 newer emoji skipped); train/validation/test hold 70/10/20% of
    the groups (1,175/168/336) and, the split being stratified by group size, about as much of the pairs
    (2,673/352/764).

    Args:
        image_size: side of the square images in pixels (the font draws at 136x128; LANCZOS resize).
        background: colour name or RGB triple behind the emoji.
        seed: fixes the split of the groups and the row order.
        max_groups: build only this many groups (a seeded random choice, split 70/10/20 among themselves; labels
            then number only these) - fast subsets for tests.
        font_path: the NotoColorEmoji.ttf to use (default: ``$HF_MMSEL_EMOJI_FONT`` or :func:`find_emoji_font`).
        cache: store the built dataset under ``HF_DATASETS_CACHE/hf_mmsel`` (keyed by the font file's hash, the
            ``emoji`` version and these arguments) so later calls only memory-map it.

    Raises :class:`EmojiFontNotFoundError` (naming the Debian package ``fonts-noto-color-emoji`` and its install
    command) when the font is missing.
    """
    from .disk_cache import load_or_build

    if int(image_size) != image_size or image_size < 1:
        raise ValueError(f"image_size must be a positive number of pixels, got {image_size}")
    if max_groups is not None and max_groups < 3:
        raise ValueError(f"max_groups must be at least 3 (one group per split) or None, got {max_groups}")
    image_size = int(image_size)
    bg = _background_rgb(background)
    path = find_emoji_font(font_path)
    target = emoji_cache_dir(path, image_size, bg, seed, max_groups)
    return load_or_build(target, lambda: _build(path, image_size, bg, seed, max_groups), cache)


def emoji_dataset_stats(dsd: DatasetDict) -> dict[str, Any]:
    """Groups and pairs per split of a loaded emoji ``DatasetDict``."""
    return {split: {"groups": len(set(ds["label"])), "pairs": len(ds)} for split, ds in dsd.items()}
