"""Parallel text: tables and the built-in emoji names, batches by step, and the alignment term in training."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import lilt
from lilt.config import ConfigError, DataConfig, DataError, TrainConfig
from lilt.data import emoji_cldr
from lilt.data.parallel import ParallelBatches, load_parallel
from lilt.training import train

from helpers import LWA, NO_DROPOUT

SOURCE_WORDS = ["red", "blue", "green", "tree", "dog", "cat", "car", "sky", "water", "ball", "house", "bird"]
TARGET_WORDS = ["man", "woman", "child", "runs", "sits", "photo", "small", "big", "fish", "on", "in", "with"]


def write_parallel(path: Path, n: int = 24) -> Path:
    """A CSV of (source, 'translation') pairs, words of the tiny BERT's vocabulary; no word on both sides."""
    rows = ["source,target,lang"]
    for i in range(n):
        source = f"{SOURCE_WORDS[i % 12]} {SOURCE_WORDS[(i * 5 + 1) % 12]}"
        target = f"{TARGET_WORDS[i % 12]} {TARGET_WORDS[(i * 5 + 1) % 12]}"  # a word-by-word translation
        rows.append(f"{source},{target},{'xx' if i % 4 else 'yy'}")
    path.write_text("\n".join(rows) + "\n")
    return path


def test_table_languages_caps_and_errors(tmp_path: Path) -> None:
    table = write_parallel(tmp_path / "par.csv")
    both = load_parallel(str(table))
    assert len(both) == 24 and set(both["lang"]) == {"xx", "yy"}
    only = load_parallel(str(table), ["xx"], {"xx": 5}, seed=3)
    assert len(only) == 5 and set(only["lang"]) == {"xx"}
    assert only["target"] != load_parallel(str(table), ["xx"], {"xx": 5}, seed=4)["target"]  # seeded choice
    (tmp_path / "bad.csv").write_text("en,target,lang\nhello,jambo,sw\n")
    with pytest.raises(DataError, match=r"lacks columns \['source'\]"):
        load_parallel(str(tmp_path / "bad.csv"))
    with pytest.raises(DataError, match="no pairs in languages"):
        load_parallel(str(table), ["sw"])
    with pytest.raises(DataError, match="existing .csv"):
        load_parallel(str(tmp_path / "missing.csv"))
    with pytest.raises(ConfigError, match="needs target languages"):
        DataConfig(parallel="builtin:emoji-cldr", langs=["en"])
    with pytest.raises(ConfigError, match="negative"):
        DataConfig(parallel=str(table), parallel_per_lang={"sw": -1})


def test_batches_are_a_function_of_the_step_and_shard_over_processes(tmp_path: Path) -> None:
    table = load_parallel(str(write_parallel(tmp_path / "par.csv")))

    def tokenize(texts):
        return {"input_ids": torch.tensor([[len(t)] for t in texts]), "attention_mask": torch.ones(len(texts), 1)}

    one = ParallelBatches(table, tokenize, 8, seed=1)
    passes = [sorted(r for step in range(1 + 3 * p, 4 + 3 * p) for r in one.rows(step)) for p in range(2)]
    assert passes[0] == passes[1] == list(range(24))  # each pass over the pairs sees every pair once
    assert one.rows(1) != one.rows(4)  # ... in a fresh order
    assert one.rows(5) == ParallelBatches(table, tokenize, 8, seed=1).rows(5)  # a resumed run draws the same
    shards = [ParallelBatches(table, tokenize, 8, seed=1, rank=r, world=2).rows(2) for r in range(2)]
    assert sorted(shards[0] + shards[1]) == sorted(one.rows(2)) and len(shards[0]) == 4
    batch = one(1)
    assert set(batch) == {"source_input_ids", "source_attention_mask", "target_input_ids", "target_attention_mask"}
    with pytest.raises(DataError, match="parallel_batch_size=32"):
        ParallelBatches(table, tokenize, 32)


def _alignment(model, table) -> float:
    """InfoNCE of each translation against every source of the table (lower: translations nearer their own)."""
    model.eval()
    with torch.no_grad():
        source, target = model.encode_text(list(table["source"])), model.encode_text(list(table["target"]))
    return float(F.cross_entropy(20 * target @ source.t(), torch.arange(len(source))))


def test_the_term_pulls_translations_toward_their_sources(make_model, tmp_path: Path) -> None:
    table_path = write_parallel(tmp_path / "par.csv")
    table = load_parallel(str(table_path))
    after = {}
    for weight in (0.0, 2.0):
        # Mean pooling: the tiny random BERT's [CLS] output is nearly the same for every text.
        model = make_model("vit", text_options={**NO_DROPOUT, "pooling": "mean"})
        lilt.apply_plan(model, LWA)
        before = _alignment(model, table)
        config = TrainConfig(steps=12, batch_size=8, lr=3e-3, warmup_steps=0, report_to=[], log_every=1,
                             output_dir=str(tmp_path / f"w{weight}"), parallel_weight=weight, parallel_batch_size=24)
        data = DataConfig(source="builtin:tiny-random", num_workers=0, options={"n": 32}, parallel=str(table_path))
        train(model, data, config)
        after[weight] = _alignment(model, table)
    assert after[2.0] < after[0.0] - 0.1 and after[2.0] < before - 0.1, (before, after)


def test_gradcache_with_parallel_text_is_refused(make_model, tmp_path: Path) -> None:
    model = make_model("vit")
    lilt.apply_plan(model, LWA)
    config = TrainConfig(steps=2, batch_size=8, accumulation_steps=2, report_to=[], output_dir=str(tmp_path))
    data = DataConfig(source="builtin:tiny-random", num_workers=0, options={"n": 16},
                      parallel=str(write_parallel(tmp_path / "p.csv")))
    with pytest.raises(ConfigError, match="plain accumulation"):
        train(model, data, config)


@pytest.mark.skipif(not (Path(emoji_cldr.FONT_PATH).exists() and Path(emoji_cldr.CLDR_DIR).exists()),
                    reason=f"the emoji font and CLDR annotations are not installed: {emoji_cldr.APT_HINT}")
def test_builtin_emoji_names_are_training_split_only(tmp_path_factory: pytest.TempPathFactory) -> None:
    cache = tmp_path_factory.mktemp("emoji") / "emoji-cldr"
    table = load_parallel("builtin:emoji-cldr", ["sw", "yo"], {"sw": 300}, options={"cache_dir": str(cache)})
    assert set(table["lang"]) == {"sw", "yo"} and table["lang"].count("sw") == 300
    train_names = emoji_cldr.load_emoji_cldr("train", langs=["en"], cache_dir=cache)
    held_out = set(emoji_cldr.load_emoji_cldr("validation", langs=["en"], cache_dir=cache)["emoji"]) | \
        set(emoji_cldr.load_emoji_cldr("test", langs=["en"], cache_dir=cache)["emoji"])
    assert not set(table["emoji"]) & held_out  # no validation or test concept, in any language
    english = dict(zip(train_names["emoji"], train_names["text"]))
    assert all(english[e] == s for e, s in zip(table["emoji"], table["source"]))
