"""builtin:emoji-cldr: built from the Debian packages, split by emoji, filtered by language, capped per language."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lilt.config import DataError
from lilt.data import emoji_cldr
from lilt.data.emoji_cldr import APT_HINT, MissingSystemData, load_emoji_cldr

pytestmark = pytest.mark.skipif(
    not (Path(emoji_cldr.FONT_PATH).exists() and Path(emoji_cldr.CLDR_DIR).exists()),
    reason=f"the emoji font and CLDR annotations are not installed: {APT_HINT}")


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh build into a temporary cache (about 5 s)."""
    root = tmp_path_factory.mktemp("emoji") / "emoji-cldr"
    emoji_cldr.emoji_cldr_root(root)
    return root


def test_build_renders_about_1500_colour_emoji(cache: Path) -> None:
    meta = __import__("json").loads((cache / "meta.json").read_text())
    assert 1400 <= meta["emoji"] <= 1700 and meta["locales"] == 147
    pngs = sorted((cache / "images").glob("*.png"))
    assert len(pngs) == meta["emoji"]
    cat = np.asarray(Image.open(cache / "images" / "1f431.png"))  # cat face
    assert cat.ndim == 3 and cat.shape[0] == cat.shape[1] and cat.shape[2] == 3
    colourful = (cat.max(-1).astype(int) - cat.min(-1)) > 60
    assert colourful.mean() > 0.2  # a colour drawing, not a blank or a monochrome outline


def test_splits_are_disjoint_by_emoji_deterministic_and_seeded(cache: Path) -> None:
    splits = {s: set(load_emoji_cldr(s, langs=["en"], cache_dir=cache)["emoji"]) for s in emoji_cldr.SPLITS}
    everything = set(load_emoji_cldr(None, langs=["en"], cache_dir=cache)["emoji"])
    assert splits["train"].isdisjoint(splits["test"]) and splits["train"].isdisjoint(splits["validation"])
    assert splits["test"].isdisjoint(splits["validation"])
    assert set().union(*splits.values()) == everything
    assert len(splits["test"]) == round(0.3 * len(everything))
    assert set(load_emoji_cldr("test", langs=["en"], cache_dir=cache)["emoji"]) == splits["test"]
    assert set(load_emoji_cldr("test", langs=["en"], split_seed=1, cache_dir=cache)["emoji"]) != splits["test"]
    # A training run's seed only picks per-language subsets: it never moves test emoji into training.
    assert set(load_emoji_cldr("test", langs=["en"], seed=1, cache_dir=cache)["emoji"]) == splits["test"]
    assert set(load_emoji_cldr("train", langs=["en"], seed=7, cache_dir=cache)["emoji"]) == splits["train"]
    # Other languages follow the same split: a test emoji is a test emoji in every language.
    assert set(load_emoji_cldr("test", langs=["sw"], cache_dir=cache)["emoji"]) <= splits["test"]


def test_languages_captions_and_budgets(cache: Path) -> None:
    data = load_emoji_cldr(None, langs=["en", "sw", "yo"], cache_dir=cache)
    assert set(data["lang"]) == {"en", "sw", "yo"}
    cat = {row["lang"]: row["text"] for row in data if row["emoji"] == "\U0001F431"}
    assert cat["en"] == "cat face" and cat["sw"] == "uso wa paka"
    capped = load_emoji_cldr("train", langs=["en", "sw"], pairs_per_lang={"sw": 50}, cache_dir=cache)
    full = load_emoji_cldr("train", langs=["en", "sw"], cache_dir=cache)
    assert capped["lang"].count("sw") == 50 and capped["lang"].count("en") == full["lang"].count("en")
    keywords = load_emoji_cldr("train", langs=["en"], keywords=True, cache_dir=cache)
    assert len(keywords) > 3 * full["lang"].count("en")


def test_clear_errors(cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(DataError, match="'xx'"):
        load_emoji_cldr("train", langs=["en", "xx"], cache_dir=cache)
    with pytest.raises(DataError, match="'valid'"):
        load_emoji_cldr("valid", cache_dir=cache)
    monkeypatch.setattr(emoji_cldr, "FONT_PATH", str(tmp_path / "missing.ttf"))
    with pytest.raises(MissingSystemData, match="apt-get install -y fonts-noto-color-emoji unicode-cldr-core"):
        emoji_cldr.emoji_cldr_root(tmp_path / "fresh")
