"""`lilt serve`: the page's callbacks answer right, and the real page works in a headless Chromium."""

from __future__ import annotations

import shutil
import socket
import sys
from pathlib import Path

import pytest
from helpers import COLOURS, searchable_fake_model, write_colour_table
from PIL import Image

from lilt.cli import main
from lilt.data import load_pairs
from lilt.embeddings import export_embeddings, open_index
from lilt.serve import Searcher, build_app, make_search

gradio = pytest.importorskip("gradio", reason="the serve extra is not installed: pip install -e '.[serve]'")

BROWSER_INSTALL = "apt-get install -y chromium chromium-driver"
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


def colour_searchers(folder: Path) -> list[Searcher]:
    """The fake colour model over an index of red/green/blue.png and one of their captions."""
    model = searchable_fake_model()
    data = load_pairs(write_colour_table(folder))
    export_embeddings(model, data, "image", folder / "images", progress=False)
    export_embeddings(model, data, "text", folder / "captions", progress=False)
    return [Searcher("images", model, open_index(folder / "images", load=True)),
            Searcher("captions", model, open_index(folder / "captions", load=True))]


def test_page_callbacks_rank_the_matching_colour_first(tmp_path: Path) -> None:
    searchers = colour_searchers(tmp_path)
    run = make_search(searchers, k=3)
    images, no_table, no_gallery, captions = run("paka", None)  # Swahili "cat": the red axis
    assert no_table == [] and no_gallery == []
    thumbnail, caption = images[0]
    assert caption.endswith("red.png") and float(caption.split()[0]) > 0.9 and max(thumbnail.size) <= 256
    assert [row[2] for row in captions][:1] == ["a cat number 0"] and captions[0][0] == 1
    images, _, _, captions = run("", Image.new("RGB", (5, 5), COLOURS["blue"]))  # a dropped image wins
    assert images[0][1].endswith("blue.png") and captions[0][2] == "a bird number 0"
    assert run("   ", None) == [[], [], [], []]
    # The same callback is what the page's Enter key runs.
    app = build_app(searchers, k=3)
    submit = next(f for f in app.fns.values() if len(f.inputs) == 1)
    assert submit.fn("dog")[0][0][1].endswith("green.png")


def test_a_missing_gradio_is_one_line_with_the_install_command(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio now raises ImportError
    assert main(["serve", "--model", str(tmp_path), "--index", str(tmp_path / "index")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'lilt[serve]'" in err


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason=f"no chromium/chromedriver: run `{BROWSER_INSTALL}` "
                    "as root (or `make browser`)")
def test_the_page_in_a_real_browser_shows_the_expected_thumbnail_first(tmp_path: Path) -> None:
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is missing: pip install -e '.[dev]'")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    app = build_app(colour_searchers(tmp_path), k=3)
    port = free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(CHROMEDRIVER), options=options)
    try:
        driver.get(f"http://127.0.0.1:{port}/")
        wait = WebDriverWait(driver, 30)
        box = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#query textarea, #query input"))
        box.send_keys("ndege", Keys.ENTER)  # Swahili "bird": the blue axis
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#gallery-0 .caption-label"))
        labels = [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#gallery-0 .caption-label")]
        assert len(labels) == 3 and labels[0].endswith("blue.png"), labels
        first = driver.find_element(By.CSS_SELECTOR, "#gallery-0 .gallery-item img")
        wait.until(lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", first))
        # The thumbnail shows the blue image (gradio serves it re-encoded, so check its pixels, not its name).
        assert driver.execute_script("""const img = arguments[0], c = document.createElement('canvas');
            c.width = img.naturalWidth; c.height = img.naturalHeight; const g = c.getContext('2d');
            g.drawImage(img, 0, 0); return Array.from(g.getImageData(1, 1, 1, 1).data.slice(0, 3));""",
                                     first)[2] > 200
        assert "a bird number 0" in wait.until(lambda d: d.find_element(By.ID, "captions-1").text)
        # Dropping an image searches with it.
        driver.find_element(By.CSS_SELECTOR, "input[type=file]").send_keys(str(tmp_path / "red.png"))
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#gallery-0 .caption-label").text.endswith("red.png"))
    finally:
        driver.quit()
        app.close()


def test_newcomer_path_train_eval_embed_search_on_a_tiny_table(tiny_dirs, tmp_path: Path, capsys) -> None:
    """The README's path on a 12-pair table: train -> eval -> embed -> search prints image file paths."""
    import time

    import yaml
    from helpers import FOLDER_CAPTIONS, LWA, NO_DROPOUT, write_images

    names = write_images(tmp_path / "data", 12, size=32)
    rows = [f"{name},{FOLDER_CAPTIONS[i % len(FOLDER_CAPTIONS)]}" for i, name in enumerate(names)]
    (tmp_path / "data" / "pairs.csv").write_text("image,text\n" + "\n".join(rows) + "\n")
    table = str(tmp_path / "data" / "pairs.csv")
    recipe = {"model": {"vision": {"name": str(tiny_dirs["vit"]), "image_size": 32},
                        "text": {"name": str(tiny_dirs["bert"]), **NO_DROPOUT}, "embed_dim": 16},
              "plan": yaml.safe_load(LWA.read_text())["plan"],
              "train": {"steps": 4, "batch_size": 4, "report_to": [], "warmup_steps": 1},
              "data": {"source": table, "num_workers": 0}}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    model, index = str(tmp_path / "run" / "model"), str(tmp_path / "index")
    steps = {"train": ["train", "--recipe", str(tmp_path / "recipe.yaml"), "--output-dir", str(tmp_path / "run")],
             "eval": ["eval", "--model", model, "--data", table, "--out", str(tmp_path / "eval")],
             "embed": ["embed", "--model", model, "--data", table, "--out", index],
             "search": ["search", "--model", model, "--index", index, "a small dog", "-k", "3"]}
    seconds = {}
    for step, args in steps.items():
        start = time.perf_counter()
        assert main(args) == 0, step
        seconds[step] = round(time.perf_counter() - start, 1)
    out = capsys.readouterr().out
    hits = out[out.index("'a small dog':"):].splitlines()[1:]
    assert len(hits) == 3
    for hit in hits:
        rank, score, path = hit.split()
        assert Path(path).is_file() and Path(path).parent == (tmp_path / "data").resolve() and abs(float(score)) <= 1
    assert (tmp_path / "eval" / "eval.json").is_file()
    print("newcomer path wall times (s):", seconds)
