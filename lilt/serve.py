"""A search page over exported indexes: type a query in any language or drop an image, see the top hits.

`build_app` makes the gradio page from one or two `Searcher`s (a model and the index it exported); with
two, their answers are shown side by side. An image index shows a gallery of thumbnails captioned
"score  path", a caption index a table of captions with scores. gradio is an optional extra
(`pip install 'lilt[serve]'`), imported only here.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Sequence

from PIL import Image

from .embeddings import Index, open_index, search_index
from .errors import ConfigError

INSTALL = "pip install 'lilt[serve]'"
THUMBNAIL = 256  # pixels on the long side: pages stay light whatever the photos' size


def require_gradio() -> Any:
    """Import gradio, or fail in one line with the command that installs it."""
    try:
        import gradio
    except ImportError:
        raise ConfigError(f"lilt serve needs gradio, an optional extra: {INSTALL}") from None
    return gradio


@dataclass
class Searcher:
    """A model and an index it exported, with a name for the page."""

    name: str
    model: Any
    index: Index

    def __call__(self, text: str | None = None, image: Any = None, k: int = 8) -> list[dict[str, Any]]:
        """The hits of one query: the image when given, else the text (none for an empty query)."""
        if image is not None:
            return search_index(self.model, self.index, images=[image], k=k)[0]["hits"]
        if text and text.strip():
            return search_index(self.model, self.index, [text.strip()], k=k)[0]["hits"]
        return []


def load_searcher(model_dir: str | Path, index: str | Path) -> Searcher:
    """Load a saved model and its index (vectors held in memory: the page answers many queries)."""
    import lilt

    model = lilt.DualEncoder.from_pretrained(model_dir).eval()
    return Searcher(f"{Path(model_dir).name} · {Path(index).name}", model, open_index(index, load=True))


def gallery(hits: Sequence[dict[str, Any]]) -> list[tuple[Image.Image, str]]:
    """Thumbnails captioned "score  path" (a grey square when the file is missing)."""
    return [(_thumbnail(hit.get("path") or ""), f"{hit['score']:.3f}  {hit.get('path') or hit['id']}")
            for hit in hits]


def caption_rows(hits: Sequence[dict[str, Any]]) -> list[list[Any]]:
    """Rows (rank, score, caption, language, id) of a caption index's hits."""
    return [[hit["rank"], round(hit["score"], 3), hit.get("text", ""), hit.get("lang") or "", hit["id"]]
            for hit in hits]


def make_search(searchers: Sequence[Searcher], k: int = 8) -> Callable[[str | None, Any], list[Any]]:
    """The page's callback: (text, image) -> a gallery and a table per searcher."""

    def run(text: str | None, image: Any = None) -> list[Any]:
        outputs: list[Any] = []
        for searcher in searchers:
            hits = searcher(text, image, k)
            is_image = searcher.index.what == "image"
            outputs += [gallery(hits) if is_image else [], [] if is_image else caption_rows(hits)]
        return outputs

    return run


def build_app(searchers: Sequence[Searcher], k: int = 8, title: str = "lilt search") -> Any:
    """The gradio page (a gradio.Blocks): query box, image drop, results side by side per searcher."""
    gr = require_gradio()
    if not 1 <= len(searchers) <= 2:
        raise ConfigError(f"build_app shows one or two searchers side by side, got {len(searchers)}.")
    run = make_search(searchers, k)
    with gr.Blocks(title=title, analytics_enabled=False) as app:  # a local tool sends nothing out
        gr.Markdown(f"# {title}\nType a query in any language and press Enter, or drop an image.")
        with gr.Row():
            text = gr.Textbox(label="query", placeholder="a red boat / mashua nyekundu", scale=4, elem_id="query")
            image = gr.Image(label="or an image", type="pil", sources=["upload", "clipboard"], height=160, scale=1)
        outputs = []
        with gr.Row():
            for i, searcher in enumerate(searchers):
                is_image = searcher.index.what == "image"
                with gr.Column():
                    gr.Markdown(f"### {searcher.name}\n{searcher.index.rows:,} {searcher.index.what}s")
                    outputs.append(gr.Gallery(label="images", columns=4, visible=is_image, elem_id=f"gallery-{i}",
                                              object_fit="contain", height="auto"))
                    outputs.append(gr.Dataframe(headers=["rank", "score", "caption", "lang", "id"],
                                                visible=not is_image, elem_id=f"captions-{i}", interactive=False))
        text.submit(lambda t: run(t, None), inputs=text, outputs=outputs)
        image.change(lambda im, t: run(t, im), inputs=[image, text], outputs=outputs)
    return app


@lru_cache(maxsize=2048)
def _thumbnail(path: str) -> Image.Image:
    try:
        with Image.open(path) as opened:
            picture = opened.convert("RGB")
    except (OSError, ValueError):
        return Image.new("RGB", (THUMBNAIL, THUMBNAIL), (200, 200, 200))
    picture.thumbnail((THUMBNAIL, THUMBNAIL))
    return picture
