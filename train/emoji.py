"""The built-in training world: Noto colour emoji composed into object-centric scenes.

Why emoji: they are free, render offline, come with a two-level semantic taxonomy (Unicode group and
subgroup) that serves as evaluation labels, and a held-out set of emoji measures whether features
generalise to unseen objects instead of memorising pixels.

Three pieces:
- `EmojiCatalog` parses ``emoji-test.txt``, folds skin-tone and gender variants into their BASE emoji,
  fixes a held-out split of bases and renders emoji lazily.
- `EmojiScenes` is a virtual, infinite training stream: one large main emoji plus small distractors on
  varied backgrounds, deterministic by (seed, index), with a per-patch label map.
- `EmojiProbeSet` is the evaluation protocol: one centred emoji per image (training bases as the kNN bank,
  held-out bases as queries).
"""
from __future__ import annotations

import hashlib
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, features
from torch.utils.data import Dataset

logger = logging.getLogger(__name__)

DEFAULT_FONT_PATH = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
DEFAULT_EMOJI_TEST_PATH = "/usr/share/unicode/emoji/emoji-test.txt"
FONT_ENV = "IJEPA_EMOJI_FONT"
EMOJI_TEST_ENV = "IJEPA_EMOJI_TEST"
INSTALL_HINT = "apt-get install fonts-noto-color-emoji unicode-data"
RENDER_SIZE = 109  # the only size at which the bitmap-only Noto Color Emoji font loads in Pillow
SPLITS = ("train", "heldout", "all")
BACKGROUND_KINDS = ("solid", "linear", "radial", "stripes", "checker", "dots", "noise")
# Kinds a scene may use but that are not drawn by default (so the evaluation's probe images never change):
# "patchwork" gives every patch its own random colour, a background no patch can predict from its neighbours.
EXTRA_BACKGROUND_KINDS = ("patchwork",)
_KNOWN_BACKGROUNDS = BACKGROUND_KINDS + EXTRA_BACKGROUND_KINDS

# Code points used by the variant folding.
_VS16 = 0xFE0F
_ZWJ = 0x200D
_SKIN_TONES = range(0x1F3FB, 0x1F400)
_GENDER_SIGNS = (0x2640, 0x2642)
_RIGHTWARDS_ARROW = 0x27A1  # ZWJ + it: "facing right" (Emoji 15.1), the base mirrored, as scenes flip emoji anyway
_PERSON, _CHILD, _OLDER_PERSON = 0x1F9D1, 0x1F9D2, 0x1F9D3
_FAMILY = (0x1F46A,)
_PEOPLE_HOLDING_HANDS = (_PERSON, _ZWJ, 0x1F91D, _ZWJ, _PERSON)
# Gendered people whose neutral form exists: man/woman -> person, boy/girl -> child, old man/woman -> older person.
_NEUTRAL_PERSON = {0x1F468: _PERSON, 0x1F469: _PERSON, 0x1F466: _CHILD, 0x1F467: _CHILD, 0x1F474: _OLDER_PERSON,
                   0x1F475: _OLDER_PERSON}
# Gendered single code points and gender-neutralised sequences that name the same thing as another base.
_ALIASES = {
    (0x1F46B,): _PEOPLE_HOLDING_HANDS,  # woman and man holding hands
    (0x1F46C,): _PEOPLE_HOLDING_HANDS,  # men holding hands
    (0x1F46D,): _PEOPLE_HOLDING_HANDS,  # women holding hands
    (_PERSON, _ZWJ, 0x2764, _ZWJ, 0x1F48B, _ZWJ, _PERSON): (0x1F48F,),  # kiss: person, person -> kiss
    (_PERSON, _ZWJ, 0x2764, _ZWJ, _PERSON): (0x1F491,),  # couple with heart: person, person -> couple with heart
    (0x1F934,): (0x1FAC5,),  # prince -> person with crown
    (0x1F478,): (0x1FAC5,),  # princess -> person with crown
    (0x1F385,): (_PERSON, _ZWJ, 0x1F384),  # Santa Claus -> mx claus
    (0x1F936,): (_PERSON, _ZWJ, 0x1F384),  # Mrs. Claus -> mx claus
    (0x1F930,): (0x1FAC4,),  # pregnant woman -> pregnant person
    (0x1FAC3,): (0x1FAC4,),  # pregnant man -> pregnant person
    (0x1F57A,): (0x1F483,),  # man dancing -> (woman) dancing
    (0x1FAF1, _ZWJ, 0x1FAF2): (0x1F91D,),  # two-skin-tone handshake (right + left hand) -> handshake
    # Territories that fly another country's flag: the font draws the two identically, so they are one base
    # (otherwise a held-out flag's exact image could be a training base's).
    (0x1F1ED, 0x1F1F2): (0x1F1E6, 0x1F1FA),  # Heard & McDonald Islands -> Australia
    (0x1F1E7, 0x1F1FB): (0x1F1F3, 0x1F1F4),  # Bouvet Island -> Norway
    (0x1F1F8, 0x1F1EF): (0x1F1F3, 0x1F1F4),  # Svalbard & Jan Mayen -> Norway
    (0x1F1E8, 0x1F1F5): (0x1F1EB, 0x1F1F7),  # Clipperton Island -> France
    (0x1F1F2, 0x1F1EB): (0x1F1EB, 0x1F1F7),  # St. Martin -> France
    (0x1F1E9, 0x1F1EC): (0x1F1EE, 0x1F1F4),  # Diego Garcia -> British Indian Ocean Territory
    (0x1F1EA, 0x1F1E6): (0x1F1EA, 0x1F1F8),  # Ceuta & Melilla -> Spain
    (0x1F1FA, 0x1F1F2): (0x1F1FA, 0x1F1F8),  # U.S. Outlying Islands -> United States
}


def fold_key(codepoints: Sequence[int]) -> tuple[int, ...]:
    """The BASE emoji a fully-qualified sequence belongs to, as code points without FE0F.

    Drops skin tones and FE0F, removes ZWJ + gender sign and ZWJ + "facing right", maps man/woman/boy/girl to
    person/child, turns any all-people ZWJ sequence into "family" and applies the aliases (gendered code points,
    territories that fly another country's flag).
    """
    cps = [c for c in codepoints if c != _VS16 and c not in _SKIN_TONES]
    kept: list[int] = []
    i = 0
    while i < len(cps):
        if cps[i] == _ZWJ and i + 1 < len(cps) and (cps[i + 1] in _GENDER_SIGNS or cps[i + 1] == _RIGHTWARDS_ARROW):
            i += 2
            continue
        kept.append(cps[i])
        i += 1
    key = tuple(_NEUTRAL_PERSON.get(c, c) for c in kept)
    if len(key) > 1 and set(key) <= {_PERSON, _CHILD, _ZWJ}:
        return _FAMILY
    return _ALIASES.get(key, key)


def zwj_parts(key: Sequence[int]) -> set[tuple[int, ...]]:
    """The base keys a ZWJ sequence is joined from (heart on fire: red heart and fire); empty for a single emoji."""
    if _ZWJ not in key:
        return set()
    parts, part = set(), []
    for c in [*key, _ZWJ]:
        if c == _ZWJ:
            parts.add(fold_key(part))
            part = []
        else:
            part.append(c)
    return parts


def _codepoints_to_text(codepoints: Sequence[int]) -> str:
    return "".join(chr(c) for c in codepoints)


def _stable_hash(text: str) -> str:
    """A hash that, unlike hash(), does not depend on PYTHONHASHSEED."""
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def _how_to_install(env: str) -> str:
    return f"Install it with `{INSTALL_HINT}`, or point {env} (or the argument) at a copy of the file."


def _resolve(path: str | os.PathLike | None, env: str, default: str, what: str) -> Path:
    """Explicit argument > environment variable (read now, not at import) > Debian default; must exist."""
    chosen = Path(path if path is not None else os.environ.get(env) or default)
    if not chosen.is_file():
        raise FileNotFoundError(f"{what} not found at {chosen}. {_how_to_install(env)}")
    return chosen


@dataclass(frozen=True)
class _Entry:
    """One fully-qualified line of emoji-test.txt."""
    codepoints: tuple[int, ...]
    name: str
    group: str
    subgroup: str

    @property
    def text(self) -> str:
        return _codepoints_to_text(self.codepoints)


def parse_emoji_test(path: str | os.PathLike) -> list[_Entry]:
    """Fully-qualified entries of emoji-test.txt in file (CLDR) order, without the "Component" group."""
    entries: list[_Entry] = []
    group = subgroup = ""
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line.startswith("# group:"):
                group = line.split(":", 1)[1].strip()
            elif line.startswith("# subgroup:"):
                subgroup = line.split(":", 1)[1].strip()
            elif line and not line.startswith("#") and group != "Component":
                fields, _, comment = line.partition("#")
                codes, _, status = fields.partition(";")
                if status.strip() != "fully-qualified":
                    continue
                name = comment.strip().split(maxsplit=2)[-1]  # "<emoji> E1.0 name words"
                entries.append(_Entry(tuple(int(c, 16) for c in codes.split()), name, group, subgroup))
    if not entries:
        raise ValueError(f"no fully-qualified emoji found in {path}: is it Unicode's emoji-test.txt?")
    return entries


def _require_colour_emoji(font: ImageFont.FreeTypeFont, path: Path) -> None:
    """Another font loads too, and draws every emoji as the same missing-glyph box or in one colour: a world of
    identical images. Two emoji drawn in colour and told apart are the evidence that this is an emoji font."""
    drawn = []
    for text in ("\U0001F600", "\U0001F436"):  # grinning face, dog face
        canvas = Image.new("RGBA", (2 * RENDER_SIZE, 2 * RENDER_SIZE))
        ImageDraw.Draw(canvas).text((0, 0), text, font=font, embedded_color=True)
        drawn.append(np.asarray(canvas, dtype=np.int16))
    seen = drawn[0][..., 3] > 0
    coloured = bool(seen.any()) and bool((np.ptp(drawn[0][..., :3], axis=-1)[seen] > 32).any())
    if not coloured or np.array_equal(drawn[0], drawn[1]):
        raise ValueError(f"{path} does not draw emoji in colour (is it the Noto Color Emoji font?). "
                         f"{_how_to_install(FONT_ENV)}")


def require_seed(seed: int) -> None:
    """numpy's generators take no negative seed; say so before the first item, in a worker, would."""
    if seed < 0:
        raise ValueError(f"seed must be at least 0, got {seed}")


class EmojiCatalog:
    """Base emoji with their variants, Unicode group/subgroup ids, a held-out split and lazy rendering.

    Base ids, group ids and subgroup ids follow the file's (CLDR) order. Variants (skin tones, genders) are
    sampled together with their base and always share its split.

    Args:
        font_path: Noto Color Emoji .ttf; default ${IJEPA_EMOJI_FONT} or the Debian path.
        emoji_test_path: Unicode emoji-test.txt; default ${IJEPA_EMOJI_TEST} or the Debian path.
        heldout_fraction: share of bases held out, chosen per subgroup by a stable hash.
    """

    def __init__(self, font_path: str | os.PathLike | None = None,
                 emoji_test_path: str | os.PathLike | None = None, heldout_fraction: float = 0.19):
        if not 0.0 < heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
        self.font_path = _resolve(font_path, FONT_ENV, DEFAULT_FONT_PATH, "Emoji font (Noto Color Emoji)")
        self.emoji_test_path = _resolve(emoji_test_path, EMOJI_TEST_ENV, DEFAULT_EMOJI_TEST_PATH,
                                        "Unicode emoji-test.txt")
        self.heldout_fraction = heldout_fraction
        self._font: ImageFont.FreeTypeFont | None = None
        self._renders: dict[int, Image.Image] = {}
        self._shaped = features.check("raqm")
        if not self._shaped:
            logger.warning("Pillow has no raqm layout: emoji sequences (skin tones, ZWJ) cannot be shaped and "
                           "will be dropped, so base ids differ from machines that have raqm.")
        self._single_advance = self.font.getlength("\U0001F600")
        entries = [e for e in parse_emoji_test(self.emoji_test_path) if self._renders_as_one_glyph(e.text)]
        self._build(entries)

    # ----- construction
    @property
    def font(self) -> ImageFont.FreeTypeFont:
        if self._font is None:
            try:
                font = ImageFont.truetype(str(self.font_path), RENDER_SIZE)
            except OSError as err:  # not a font, or a colour bitmap font without this size
                raise ValueError(f"{self.font_path}: cannot be read as the Noto Color Emoji font ({err}). "
                                 f"{_how_to_install(FONT_ENV)}") from None
            _require_colour_emoji(font, self.font_path)
            self._font = font
        return self._font

    def _renders_as_one_glyph(self, text: str) -> bool:
        """Sequences the font cannot ligate come out as several glyphs side by side: compare advances. A code point
        the font lacks (an emoji-test.txt newer than the font) keeps the advance but draws nothing: its bbox has
        no height.

        Both come from the layout, without rasterising anything.
        """
        if self.font.getlength(text) > 1.5 * self._single_advance:
            return False
        if not self._shaped and any(0xE0020 <= ord(c) <= 0xE007F for c in text):
            return False  # tag sequences (England, Scotland, Wales) fall back to the plain black flag unshaped
        _, top, _, bottom = self.font.getbbox(text)
        return bottom > top

    def _build(self, entries: list[_Entry]) -> None:
        members: dict[tuple[int, ...], list[int]] = {}
        for i, e in enumerate(entries):
            members.setdefault(fold_key(e.codepoints), []).append(i)
        # The base is the entry that IS the key (e.g. plain thumbs up), else the first one in file order.
        base_entry = {}
        for key, idx in members.items():
            exact = [i for i in idx if tuple(c for c in entries[i].codepoints if c != _VS16) == key]
            base_entry[key] = exact[0] if exact else idx[0]
        keys = sorted(members, key=lambda k: base_entry[k])

        self.keys: list[tuple[int, ...]] = keys
        self.names: list[str] = [entries[base_entry[k]].name for k in keys]
        self.texts: list[str] = [entries[base_entry[k]].text for k in keys]
        groups = [entries[base_entry[k]].group for k in keys]
        subgroups = [entries[base_entry[k]].subgroup for k in keys]
        self.group_names: list[str] = list(dict.fromkeys(groups))
        self.subgroup_names: list[str] = list(dict.fromkeys(subgroups))
        self.group_of = torch.tensor([self.group_names.index(g) for g in groups], dtype=torch.long)
        self.subgroup_of = torch.tensor([self.subgroup_names.index(s) for s in subgroups], dtype=torch.long)
        self.subgroup_group = torch.zeros(len(self.subgroup_names), dtype=torch.long)
        self.subgroup_group[self.subgroup_of] = self.group_of

        # Variants: base first, then the others in file order; flattened for O(1) uniform sampling.
        self.variant_texts: list[str] = []
        starts, counts = [], []
        for k in keys:
            order = [base_entry[k]] + [i for i in members[k] if i != base_entry[k]]
            starts.append(len(self.variant_texts))
            counts.append(len(order))
            self.variant_texts.extend(entries[i].text for i in order)
        self.variant_start = np.asarray(starts, dtype=np.int64)
        self.variant_count = np.asarray(counts, dtype=np.int64)
        self.variant_base = np.repeat(np.arange(len(keys)), counts)
        self._base_of_key = {k: b for b, k in enumerate(keys)}

        # Held-out split: within each subgroup, the bases with the smallest stable hashes.
        self.is_heldout = np.zeros(len(keys), dtype=bool)
        for s in range(len(self.subgroup_names)):
            ids = np.flatnonzero(self.subgroup_of.numpy() == s)
            if len(ids) < 2:
                continue
            n_held = min(len(ids) - 1, max(1, round(self.heldout_fraction * len(ids))))
            ranked = sorted(ids, key=lambda b: _stable_hash(" ".join(f"{c:X}" for c in keys[b])))
            self.is_heldout[ranked[:n_held]] = True
        # A base built from a held-out one (heart on fire from fire, polar bear from bear) would show training the
        # held-out emoji: it is held out too, and so on until no training base has a held-out part.
        parts = [zwj_parts(k) & self._base_of_key.keys() - {k} for k in keys]
        while moved := [b for b, p in enumerate(parts)
                        if not self.is_heldout[b] and any(self.is_heldout[self._base_of_key[q]] for q in p)]:
            self.is_heldout[moved] = True

    # ----- lookups
    def __len__(self) -> int:
        return len(self.keys)

    def split_ids(self, split: str) -> np.ndarray:
        """Base ids of a split: "train", "heldout" or "all"."""
        if split == "train":
            return np.flatnonzero(~self.is_heldout)
        if split == "heldout":
            return np.flatnonzero(self.is_heldout)
        if split == "all":
            return np.arange(len(self))
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")

    def base_of(self, text: str) -> int:
        """Base id of any emoji string (a base or any of its skin-tone/gender variants)."""
        key = fold_key([ord(c) for c in text])
        if key not in self._base_of_key:
            raise KeyError(f"{text!r} is not an emoji this catalog knows (or the font cannot render it)")
        return self._base_of_key[key]

    def variants(self, base_id: int) -> list[str]:
        start = int(self.variant_start[base_id])
        return self.variant_texts[start:start + int(self.variant_count[base_id])]

    def labels(self, base_ids: torch.Tensor, level: str) -> torch.Tensor:
        """Map base ids (e.g. a patch_emoji map) to "group" or "subgroup" ids, keeping -1 (background)."""
        table = {"group": self.group_of, "subgroup": self.subgroup_of}.get(level)
        if table is None:
            raise ValueError(f"level must be 'group' or 'subgroup', got {level!r}")
        mapped = table.to(base_ids.device)[base_ids.clamp(min=0)]
        return torch.where(base_ids >= 0, mapped, torch.full_like(mapped, -1))

    @property
    def fingerprint(self) -> str:
        """Identifies bases, ids and split: store it with results so ids are only compared when it matches."""
        text = ";".join(f"{' '.join(f'{c:X}' for c in k)}:{int(h)}" for k, h in zip(self.keys, self.is_heldout))
        return _stable_hash(text)[:12]

    # ----- rendering
    def render(self, variant: int) -> Image.Image:
        """RGBA image of a variant (index into variant_texts), cropped to its alpha bbox."""
        return self.render_premultiplied(variant).convert("RGBA")

    def render_premultiplied(self, variant: int) -> Image.Image:
        """Premultiplied-alpha ("RGBa") render of a variant, cropped to its alpha bbox; rendered once, cached.

        Premultiplied because that is what resizing and compositing need: Pillow resizes "RGBa" directly.
        """
        image = self._renders.get(variant)
        if image is None:
            text = self.variant_texts[variant]
            left, top, right, bottom = self.font.getbbox(text)
            canvas = Image.new("RGBA", (right - left + 8, bottom - top + 8))
            ImageDraw.Draw(canvas).text((4 - left, 4 - top), text, font=self.font, embedded_color=True)
            bbox = canvas.getchannel("A").getbbox()
            if bbox is None:
                raise RuntimeError(f"the font rendered {text!r} as an empty image")
            image = self._renders[variant] = canvas.crop(bbox).convert("RGBa")
        return image

    def warm_up(self, split: str = "all") -> None:
        """Render every variant of a split now, e.g. before DataLoader workers fork so they share the renders."""
        for b in self.split_ids(split):
            for v in range(int(self.variant_start[b]), int(self.variant_start[b] + self.variant_count[b])):
                self.render_premultiplied(v)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_font"] = None  # reopened lazily after unpickling (spawned DataLoader workers)
        return state


@lru_cache(maxsize=4)
def _cached_catalog(font_path: Path, emoji_test_path: Path) -> EmojiCatalog:
    return EmojiCatalog(font_path, emoji_test_path)


def get_catalog(font_path: str | os.PathLike | None = None,
                emoji_test_path: str | os.PathLike | None = None) -> EmojiCatalog:
    """A process-wide shared catalog per (font, emoji-test) pair, so datasets share renders."""
    font = _resolve(font_path, FONT_ENV, DEFAULT_FONT_PATH, "Emoji font (Noto Color Emoji)")
    test = _resolve(emoji_test_path, EMOJI_TEST_ENV, DEFAULT_EMOJI_TEST_PATH, "Unicode emoji-test.txt")
    return _cached_catalog(font.resolve(), test.resolve())


# ---------------------------------------------------------------------------------------------------------
# Scene composition


@dataclass(frozen=True)
class Placement:
    """One emoji in a scene; objects are listed bottom to top."""
    variant: int  # index into EmojiCatalog.variant_texts
    base: int  # its base id
    size: int  # pixels of the glyph's longer side
    cx: float  # centre on the canvas, pixels (may lie near or past the border)
    cy: float
    flip: bool = False


@dataclass(frozen=True)
class SceneLayout:
    objects: tuple[Placement, ...]
    main: int  # position of the main object in `objects`
    background: str


class GlyphCache:
    """Resized glyphs as (premultiplied rgb [3,h,w], alpha [h,w]) float32 arrays, LRU-bounded in bytes.

    Misses resize from the smallest level of a per-variant mip chain (full, 1/2, 1/4, ...) that is still at
    least as large as the target, which keeps a miss at a few tens of microseconds for small scenes.
    """

    def __init__(self, catalog: EmojiCatalog, max_mb: float = 64.0):
        self.catalog = catalog
        self.max_bytes = int(max_mb * 2**20)
        self._entries: OrderedDict[tuple[int, int], tuple[np.ndarray, np.ndarray, int]] = OrderedDict()
        self._bytes = 0
        self._mips: dict[int, list[Image.Image]] = {}  # reduced levels only; level 0 lives in the catalog

    def _source(self, variant: int, size: int) -> Image.Image:
        full = self.catalog.render_premultiplied(variant)
        if max(full.size) < 2 * size:
            return full
        mips = self._mips.get(variant)
        if mips is None:
            mips, level = [], full
            while min(level.size) >= 16:
                level = level.reduce(2)
                mips.append(level)
            self._mips[variant] = mips
        source = full
        for level in mips:
            if max(level.size) < size:
                break
            source = level
        return source

    def get(self, variant: int, size: int) -> tuple[np.ndarray, np.ndarray]:
        key = (variant, size)
        hit = self._entries.get(key)
        if hit is not None:
            self._entries.move_to_end(key)
            return hit[0], hit[1]
        source = self._source(variant, size)
        scale = size / max(source.size)
        shape = (max(1, round(source.width * scale)), max(1, round(source.height * scale)))
        # Channel-first and contiguous: compositing then broadcasts alpha over a leading axis (fast).
        rgba = np.ascontiguousarray(np.asarray(source.resize(shape, Image.BILINEAR)).transpose(2, 0, 1))
        rgba = rgba.astype(np.float32) * np.float32(1 / 255)
        rgb, alpha = rgba[:3], rgba[3]
        nbytes = rgba.nbytes
        self._entries[key] = (rgb, alpha, nbytes)
        self._bytes += nbytes
        while self._bytes > self.max_bytes and len(self._entries) > 1:
            self._bytes -= self._entries.popitem(last=False)[1][2]
        return rgb, alpha


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    return rng.random(3, dtype=np.float32)


class SceneRenderer:
    """Draws backgrounds and composites placed emoji; also computes the per-patch label map."""

    def __init__(self, catalog: EmojiCatalog, resolution: int, patch_size: int, glyph_cache_mb: float = 64.0):
        if resolution < 8:
            raise ValueError(f"resolution must be at least 8 pixels, got {resolution}")
        if patch_size < 1 or resolution % patch_size:
            raise ValueError(f"patch_size ({patch_size}) must divide resolution ({resolution})")
        self.catalog = catalog
        self.resolution = resolution
        self.patch_size = patch_size
        self.glyph_cache_mb = glyph_cache_mb
        self.glyphs = GlyphCache(catalog, glyph_cache_mb)
        self._coords = (np.arange(resolution, dtype=np.float32) + 0.5) / resolution  # pixel centres in (0, 1)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["glyphs"] = None  # rebuilt empty in the worker: no point shipping cached arrays
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.glyphs = GlyphCache(self.catalog, self.glyph_cache_mb)

    # ----- backgrounds
    def background(self, kind: str, rng: np.random.Generator) -> np.ndarray:
        """A float32 [3, H, W] background in [0, 1] of the given kind (see BACKGROUND_KINDS).

        Patterns are built from 1-D coordinate vectors and broadcasting: a handful of 2-D operations each.
        """
        res = self.resolution
        c1 = _random_colour(rng)
        if kind == "solid":
            return np.broadcast_to(c1[:, None, None], (3, res, res)).copy()
        if kind == "patchwork":
            cells = rng.random((3, res // self.patch_size, res // self.patch_size), dtype=np.float32)
            return np.repeat(np.repeat(cells, self.patch_size, axis=1), self.patch_size, axis=2)
        if kind == "noise":
            amplitude = np.float32(rng.uniform(0.03, 0.12))
            noise = rng.random((3, res, res), dtype=np.float32) - np.float32(0.5)
            return np.clip(c1[:, None, None] + amplitude * noise, 0.0, 1.0)
        # Two-colour patterns: weight t in [0, 1] blends c1 -> c2.
        c2 = c1 + np.float32(rng.uniform(0.25, 1.0)) * (_random_colour(rng) - c1)
        x, y = self._coords[None, :], self._coords[:, None]  # [1, W] and [H, 1], in [0, 1)
        if kind == "linear":
            angle = rng.uniform(0, 2 * np.pi)
            dx, dy = np.float32(np.cos(angle)), np.float32(np.sin(angle))
            t = (x * dx + y * dy - min(0, dx) - min(0, dy)) / np.float32(abs(dx) + abs(dy))
        elif kind == "radial":
            cx, cy = rng.random(2, dtype=np.float32)
            t = np.minimum(np.sqrt((x - cx) ** 2 + (y - cy) ** 2) * np.float32(1 / rng.uniform(0.4, 1.2)), 1.0)
        elif kind == "stripes":
            angle, frequency, phase = rng.uniform(0, np.pi), rng.uniform(4, 16), rng.random()
            proj = x * np.float32(np.cos(angle) * frequency) + (y * np.float32(np.sin(angle) * frequency) + phase)
            t = (proj - np.floor(proj) < rng.uniform(0.3, 0.7)).astype(np.float32)
        elif kind == "checker":
            cells = rng.uniform(4, 16)
            ox, oy = rng.random(2)
            parity = np.floor(x * cells + ox).astype(np.int32) + np.floor(y * cells + oy).astype(np.int32)
            t = (parity & 1).astype(np.float32)
        elif kind == "dots":
            cells = rng.uniform(4, 12)
            ox, oy = rng.random(2)
            u, v = x * cells + ox, y * cells + oy
            dx2, dy2 = (u - np.floor(u) - 0.5) ** 2, (v - np.floor(v) - 0.5) ** 2
            t = (dx2 + dy2 < rng.uniform(0.15, 0.4) ** 2).astype(np.float32)
        else:
            raise ValueError(f"unknown background kind {kind!r}; choose from {_KNOWN_BACKGROUNDS}")
        image = np.empty((3, res, res), dtype=np.float32)
        for c in range(3):  # per channel: much faster than broadcasting over a trailing axis of 3
            np.multiply(t, c2[c] - c1[c], out=image[c])
            image[c] += c1[c]
        return image

    # ----- composition
    def compose(self, background: np.ndarray, objects: Sequence[Placement]) -> tuple[np.ndarray, np.ndarray]:
        """Alpha-composite objects (bottom to top) onto a copy of background.

        Returns the image [3, H, W] float32 in [0, 1] and the patch map [H/p, W/p] int64: for each patch, the
        base id of the object whose visible pixels (alpha > 0.5, topmost wins per pixel) are the most common
        label in the patch, or -1 where background pixels are the most common (ties go to the upper layer).
        """
        image = np.array(background, dtype=np.float32, copy=True)
        layer = np.full(image.shape[1:], -1, dtype=np.int64)
        for index, obj in enumerate(objects):
            rgb, alpha = self.glyphs.get(obj.variant, obj.size)
            if obj.flip:
                rgb, alpha = rgb[:, :, ::-1], alpha[:, ::-1]
            h, w = alpha.shape
            self._paste(image, layer, rgb, alpha, int(round(obj.cx - w / 2)), int(round(obj.cy - h / 2)), index)
        np.clip(image, 0.0, 1.0, out=image)
        return image, self._patch_labels(layer, [o.base for o in objects])

    @staticmethod
    def _paste(image: np.ndarray, layer: np.ndarray, rgb: np.ndarray, alpha: np.ndarray, x0: int, y0: int,
               index: int) -> None:
        H, W = layer.shape
        h, w = alpha.shape
        top, left, bottom, right = max(y0, 0), max(x0, 0), min(y0 + h, H), min(x0 + w, W)
        if top >= bottom or left >= right:
            return
        a = alpha[top - y0:bottom - y0, left - x0:right - x0]
        region = image[:, top:bottom, left:right]
        region *= 1.0 - a
        region += rgb[:, top - y0:bottom - y0, left - x0:right - x0]
        layer[top:bottom, left:right][a > 0.5] = index

    def _patch_labels(self, layer: np.ndarray, bases: list[int]) -> np.ndarray:
        p, n_layers = self.patch_size, len(bases)
        g = self.resolution // p
        patch_of_pixel = (np.arange(self.resolution) // p)
        cell = (patch_of_pixel[:, None] * g + patch_of_pixel[None, :])
        counts = np.bincount((cell * (n_layers + 1) + layer + 1).ravel(), minlength=g * g * (n_layers + 1))
        counts = counts.reshape(g * g, n_layers + 1)
        # Two copies of one base (siblings, a theme) cover a patch together: pool their pixels on the topmost copy,
        # so that in a tie with an emoji drawn between them the one on top still wins.
        top_copy = [0] + [1 + max(i for i, b in enumerate(bases) if b == base) for base in bases]
        pooled = np.zeros_like(counts)
        np.add.at(pooled.T, top_copy, counts.T)
        winner = n_layers - np.argmax(pooled[:, ::-1], axis=1)  # column index; reversed so upper layers win ties
        lookup = np.asarray([-1] + list(bases), dtype=np.int64)
        return lookup[winner].reshape(g, g)


def _item(image: np.ndarray, patches: np.ndarray, index: int, base: int, catalog: EmojiCatalog) -> dict:
    return {
        "image": torch.from_numpy(image),
        "index": index,
        "emoji": base,
        "group": int(catalog.group_of[base]),
        "subgroup": int(catalog.subgroup_of[base]),
        "patch_emoji": torch.from_numpy(patches),
    }


def _check_backgrounds(backgrounds: Sequence[str]) -> tuple[str, ...]:
    backgrounds = tuple(backgrounds)
    unknown = [b for b in backgrounds if b not in _KNOWN_BACKGROUNDS]
    if not backgrounds or unknown:
        raise ValueError(f"backgrounds must be a non-empty subset of {_KNOWN_BACKGROUNDS}, got {backgrounds}")
    return backgrounds


class EmojiScenes(Dataset):
    """Object-centric emoji scenes composed on the fly; ``ds[i]`` is defined for every i >= 0.

    Each scene: one large main emoji (a training BASE drawn uniformly, then one of its variants uniformly)
    at a random position (partly cropped at the border at most ``max_crop`` of its side), plus a few
    smaller distractors in front of or behind it, random horizontal flips, on a random background.
    The same (seed, index) always gives the same item.

    Args:
        catalog: shared `EmojiCatalog`; default `get_catalog()`.
        resolution: image side in pixels.
        patch_size: patch side for the ``patch_emoji`` map; must divide resolution.
        seed: stream seed.
        split: which bases appear: "train" (for training), "heldout" or "all".
        length: nominal epoch size returned by len().
        main_scale: range of the main emoji's longer side, as a fraction of the image side.
        num_distractors: inclusive range of the number of distractors.
        distractor_scale: range of a distractor's longer side, as a fraction of the image side.
        distractor_front_prob: probability that a distractor is drawn over the main emoji.
        max_crop: largest fraction of the main emoji's side that may fall outside the image.
        flip_prob: probability of mirroring each emoji.
        backgrounds: background kinds drawn uniformly (BACKGROUND_KINDS, or EXTRA_BACKGROUND_KINDS).
        balance: "base" draws every base emoji equally often (country flags are then ~16% of scenes);
            "subgroup" draws a subgroup uniformly, then a base within it. Variants are always uniform within
            their base, so skin tones never dominate.
        same_base_prob: probability that a distractor is another instance (fresh variant, size, flip) of the
            main emoji's base, so a hidden object can be predicted from its visible siblings.
        theme_prob: probability that a distractor is drawn from the main emoji's ``theme`` (its Unicode
            subgroup or group) instead of from all bases: scenes then have co-occurrence, as photos do (a plate
            holds food), so what is visible says what KIND of thing is hidden, not which one.
        theme: "subgroup" or "group", the label a themed distractor shares with the main emoji.
        glyph_cache_mb: memory bound of the per-worker resized-glyph cache.
    """

    def __init__(self, catalog: EmojiCatalog | None = None, resolution: int = 64, patch_size: int = 4,
                 seed: int = 0, split: str = "train", length: int = 100_000,
                 main_scale: tuple[float, float] = (0.45, 0.9), num_distractors: tuple[int, int] = (0, 3),
                 distractor_scale: tuple[float, float] = (0.15, 0.35), distractor_front_prob: float = 0.5,
                 max_crop: float = 0.25, flip_prob: float = 0.5, backgrounds: Sequence[str] = BACKGROUND_KINDS,
                 balance: str = "base", same_base_prob: float = 0.0, theme_prob: float = 0.0,
                 theme: str = "subgroup", glyph_cache_mb: float = 64.0):
        if length < 1:
            raise ValueError(f"length must be positive, got {length}")
        require_seed(seed)
        for name, (lo, hi) in (("main_scale", main_scale), ("distractor_scale", distractor_scale)):
            if not 0 < lo <= hi:
                raise ValueError(f"{name} must satisfy 0 < low <= high, got {(lo, hi)}")
        if not 0 <= num_distractors[0] <= num_distractors[1]:
            raise ValueError(f"num_distractors must satisfy 0 <= low <= high, got {num_distractors}")
        if not 0.0 <= max_crop < 0.5:
            raise ValueError(f"max_crop must be in [0, 0.5), got {max_crop}")
        self.catalog = catalog if catalog is not None else get_catalog()
        self.renderer = SceneRenderer(self.catalog, resolution, patch_size, glyph_cache_mb)
        self.resolution, self.patch_size, self.seed, self.split, self.length = (
            resolution, patch_size, seed, split, length)
        self.main_scale, self.num_distractors, self.distractor_scale = main_scale, num_distractors, distractor_scale
        self.distractor_front_prob, self.max_crop, self.flip_prob = distractor_front_prob, max_crop, flip_prob
        self.backgrounds = _check_backgrounds(backgrounds)
        self.base_ids = self.catalog.split_ids(split)
        if len(self.base_ids) == 0:
            raise ValueError(f"split {split!r} has no emoji")
        if balance not in ("base", "subgroup"):
            raise ValueError(f"balance must be 'base' or 'subgroup', got {balance!r}")
        self.balance = balance
        if not 0.0 <= same_base_prob <= 1.0:
            raise ValueError(f"same_base_prob must be in [0, 1], got {same_base_prob}")
        self.same_base_prob = same_base_prob
        if not 0.0 <= theme_prob <= 1.0:
            raise ValueError(f"theme_prob must be in [0, 1], got {theme_prob}")
        if theme not in ("subgroup", "group"):
            raise ValueError(f"theme must be 'subgroup' or 'group', got {theme!r}")
        self.theme_prob, self.theme = theme_prob, theme
        self._subgroup_members = list(self._members_by(self.catalog.subgroup_of.numpy()).values())
        # a copy, not a view: pickling the dataset for spawn/forkserver DataLoader workers moves the catalog's
        # tensors into shared memory, which would leave a view pointing at freed memory
        self._theme_of = {"subgroup": self.catalog.subgroup_of, "group": self.catalog.group_of}[theme].numpy().copy()
        self._theme_members = self._members_by(self._theme_of)

    def __len__(self) -> int:
        return self.length

    @property
    def fingerprint(self) -> str:
        """The catalog's (its bases, ids and held-out split): a resumed run must find the same one
        (``train.data.check_resumed_data``)."""
        return self.catalog.fingerprint

    def _members_by(self, label_of: np.ndarray) -> dict[int, np.ndarray]:
        """label -> this split's base ids with that label (labels in increasing order)."""
        labels = label_of[self.base_ids]
        return {int(t): self.base_ids[labels == t] for t in np.unique(labels)}

    def _size(self, scale_range: tuple[float, float], rng: np.random.Generator) -> int:
        """Glyph size in pixels, quantised (1 px up to 64 px images, coarser above) so the cache can hit."""
        quantum = max(1, self.resolution // 64)
        size = rng.uniform(*scale_range) * self.resolution
        return max(quantum, int(round(size / quantum)) * quantum)

    def _object(self, size: int, cx: float, cy: float, rng: np.random.Generator, base: int | None = None
                ) -> Placement:
        if base is None and self.balance == "subgroup":
            members = self._subgroup_members[rng.integers(len(self._subgroup_members))]
            base = int(members[rng.integers(len(members))])
        elif base is None:
            base = int(self.base_ids[rng.integers(len(self.base_ids))])
        variant = int(self.catalog.variant_start[base] + rng.integers(self.catalog.variant_count[base]))
        return Placement(variant, base, size, cx, cy, bool(rng.random() < self.flip_prob))

    def _layout(self, rng: np.random.Generator) -> SceneLayout:
        res = self.resolution
        size = self._size(self.main_scale, rng)
        margin = (0.5 - self.max_crop) * size  # centre at least this far inside the border
        lo, hi = (margin, res - margin) if margin < res - margin else (res / 2, res / 2)
        main = self._object(size, rng.uniform(lo, hi), rng.uniform(lo, hi), rng)
        behind, front = [], []
        for _ in range(int(rng.integers(self.num_distractors[0], self.num_distractors[1] + 1))):
            base = None
            if self.same_base_prob > 0 and rng.random() < self.same_base_prob:
                base = main.base
            elif self.theme_prob > 0 and rng.random() < self.theme_prob:
                members = self._theme_members[int(self._theme_of[main.base])]
                base = int(members[rng.integers(len(members))])
            obj = self._object(self._size(self.distractor_scale, rng), rng.uniform(0, res), rng.uniform(0, res), rng,
                               base=base)
            (front if rng.random() < self.distractor_front_prob else behind).append(obj)
        kind = self.backgrounds[rng.integers(len(self.backgrounds))]
        return SceneLayout(tuple(behind + [main] + front), len(behind), kind)

    @staticmethod
    def _rng(seed: int, index: int) -> np.random.Generator:
        return np.random.default_rng(np.random.SeedSequence([seed, index]))

    def layout(self, index: int) -> SceneLayout:
        """What ``self[index]`` shows, without drawing it."""
        return self._layout(self._rng(self.seed, self._check_index(index)))

    @staticmethod
    def _check_index(index: int) -> int:
        index = int(index)
        if index < 0:
            raise IndexError(f"EmojiScenes indices are non-negative, got {index}")
        return index

    def __getitem__(self, index: int) -> dict:
        index = self._check_index(index)
        rng = self._rng(self.seed, index)
        layout = self._layout(rng)
        background = self.renderer.background(layout.background, rng)
        image, patches = self.renderer.compose(background, layout.objects)
        return _item(image, patches, index, layout.objects[layout.main].base, self.catalog)


class EmojiProbeSet(Dataset):
    """Evaluation images: ONE centred emoji per image at a fixed scale, ``copies`` per base emoji.

    split="train" gives the kNN bank (every training base), split="heldout" the queries (every held-out base).
    Copies differ in background and variant; everything is fixed by ``seed``. Labels: "group", "subgroup".
    """

    def __init__(self, catalog: EmojiCatalog | None = None, split: str = "heldout", resolution: int = 64,
                 patch_size: int = 4, copies: int = 2, seed: int = 0, scale: float = 0.75,
                 backgrounds: Sequence[str] = BACKGROUND_KINDS):
        if copies < 1:
            raise ValueError(f"copies must be at least 1, got {copies}")
        require_seed(seed)
        if not 0 < scale <= 1:
            raise ValueError(f"scale must be in (0, 1], got {scale}")
        self.catalog = catalog if catalog is not None else get_catalog()
        self.renderer = SceneRenderer(self.catalog, resolution, patch_size)
        self.split, self.resolution, self.copies, self.seed, self.scale = split, resolution, copies, seed, scale
        self.backgrounds = _check_backgrounds(backgrounds)
        self.base_ids = self.catalog.split_ids(split)

    def __len__(self) -> int:
        return len(self.base_ids) * self.copies

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} probe images")
        base, copy = int(self.base_ids[index // self.copies]), index % self.copies
        # Keyed by base id, not position, so an emoji's probe images do not depend on the split's other members.
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, base, copy, 0x9E0BE]))
        variant = int(self.catalog.variant_start[base] + rng.integers(self.catalog.variant_count[base]))
        centre = self.resolution / 2
        obj = Placement(variant, base, max(1, round(self.scale * self.resolution)), centre, centre)
        background = self.renderer.background(self.backgrounds[rng.integers(len(self.backgrounds))], rng)
        image, patches = self.renderer.compose(background, [obj])
        return _item(image, patches, index, base, self.catalog)
