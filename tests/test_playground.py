"""The web playground at `/`, in a real headless browser (Debian's chromium via Playwright)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import torch

from scratchlm.checkpoint import write_run
from scratchlm.config import ModelConfig, RunConfig
from scratchlm.model import Transformer
from scratchlm.serve import create_app, running_server
from scratchlm.tokenizer import train_char

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update"]
TEXT = ("The quick brown fox jumps over the lazy dog. Hello, World!\nabcdefghijklmnopqrstuvwxyz "
        "ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789:")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("run") / "playground-run"
    tok = train_char([TEXT])
    tok.save(d.parent / "tokenizer.json")
    cfg = RunConfig(model=ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=4, d_model=32,
                                      context_length=128))
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 1.0 if "emb" in name else 0.15)
    write_run(d, model, cfg, d.parent / "tokenizer.json")
    with running_server(create_app(d, max_batch=2)) as url:
        yield url


def test_playground_page_is_self_contained(server):
    """The page and its assets come from this server; nothing points at another host."""
    html = httpx.get(server + "/").text
    assert '<textarea id="prompt"' in html
    for asset in ("/static/app.js", "/static/style.css"):
        r = httpx.get(server + asset)
        assert r.status_code == 200 and "http://" not in r.text and "https://" not in r.text
    assert "http" not in html.replace('charset="utf-8"', "")


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} not found: apt-get install -y chromium")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


@pytest.mark.browser
def test_playground_streams_a_completion(server, browser):
    page = browser.new_page(viewport={"width": 1100, "height": 700})
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    page.goto(server + "/")
    page.wait_for_function("document.getElementById('model').textContent.includes('playground-run')",
                           timeout=10_000)
    assert not page.is_visible("#api-key-row")  # the server has no --api-key
    page.fill("#prompt", "The quick brown fox")
    page.fill("#max_tokens", "40")
    page.fill("#seed", "3")
    page.fill("#top_k", "20")
    page.click("#generate")
    page.wait_for_selector("#status[data-state=done], #status[data-state=error]", timeout=20_000)
    assert page.get_attribute("#status", "data-state") == "done", page.inner_text("#status")
    text = page.inner_text("#output")
    status = page.inner_text("#status")
    # The same request through the API, not streamed: the page showed exactly that text.
    want = httpx.post(server + "/v1/completions", timeout=30, json={
        "prompt": "The quick brown fox", "max_tokens": 40, "seed": 3, "top_k": 20,
        "temperature": 0.8, "top_p": 0.95}).json()["choices"][0]
    assert text == want["text"] and text
    assert f"done ({want['finish_reason']})" in status and "tokens/s" in status
    assert all(u.startswith(server) for u in requests), requests
    assert any(u.endswith("/v1/completions") for u in requests)
    page.close()


@pytest.mark.browser
def test_playground_chat_mode_and_errors(server, browser):
    page = browser.new_page()
    page.goto(server + "/")
    page.wait_for_function("document.getElementById('model').textContent.includes('playground-run')",
                           timeout=10_000)
    page.select_option("#mode", "chat")
    page.fill("#prompt", "Hello")
    page.fill("#max_tokens", "20")
    page.click("#generate")
    page.wait_for_selector("#status[data-state=done], #status[data-state=error]", timeout=20_000)
    assert page.get_attribute("#status", "data-state") == "done", page.inner_text("#status")
    page.fill("#max_tokens", "5000")  # beyond the context: the server's 400 is shown
    page.click("#generate")
    page.wait_for_selector("#status[data-state=error]", timeout=20_000)
    assert "context" in page.inner_text("#status")
    page.close()
