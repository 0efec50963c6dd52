"""``cppo inspect``: the page's numbers are the objective's, what the model wrote is escaped, and the command
runs end to end (it starts its own servers) with clear errors for what it cannot do."""

from __future__ import annotations

import html.parser
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from servers import running_server

from shared.images import encode_image_data_url
from shared.synth_data import SynthSettings, write_dataset
from shared.tiny_model import build_tiny_model
from shared.vlm import load_model, load_processor, suppressed_token_ids
from trainer.clients import RewardClient, RolloutReplicas
from trainer.config import load_config
from trainer.data import evaluation_examples
from trainer.experience import collate, rows_with_advantages
from trainer.inspect_page import render_page
from trainer.inspection import COLUMNS, PASSES, InspectedPrompt, InspectedResponse, inspect_tokens, sample
from trainer.objective import ObjectiveConfig, ObjectiveInputs, perception_tokens
from trainer.policy import response_logprobs
from trainer.rollouts import ScoredBatch

REPO = Path(__file__).resolve().parents[1]


class NumberTables(html.parser.HTMLParser):
    """The page's per-token tables, as rows of cell texts (one list per response)."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self.cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag == "table" and ("class", "numbers") in attrs:
            self.tables.append([])
        elif tag == "tr" and self.tables and self.cell is None:
            self.tables[-1].append([])
        elif tag in ("td", "th") and self.tables:
            self.cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self.cell is not None and self.tables:
            self.tables[-1][-1].append("".join(self.cell))
            self.cell = None

    def handle_data(self, data: str) -> None:
        if self.cell is not None:
            self.cell.append(data)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("inspect")
    model = build_tiny_model(root / "model", seed=0)
    data = write_dataset(root / "data", SynthSettings(train=8, test=8, seed=0, image_size=56))
    logs = tmp_path_factory.mktemp("logs")
    with (
        running_server("rollout-server", ["--model", str(model)], logs) as rollout,
        running_server("reward-server", ["--workers", "1"], logs) as reward,
    ):
        yield {"model": model, "data": data, "rollout": rollout.url, "reward": reward.url}


def test_the_pages_numbers_are_the_objectives(stack):
    config = load_config(
        REPO / "configs/demo.yaml",
        [f"model.path={stack['model']}", f"data.path={stack['data']}", "rollout.n=4", "rollout.max_tokens=3"],
    )
    processor = load_processor(str(stack["model"]))
    model = load_model(stack["model"], dtype=torch.float32).eval()
    suppressed = suppressed_token_ids(processor.tokenizer)

    @torch.no_grad()
    def score(batch, passes):
        return {p: response_logprobs(model, batch, p, torch.float32, 2.0, suppressed) for p in passes}

    examples = evaluation_examples(config, 2)
    replicas = RolloutReplicas.from_config(config.rollout, [stack["rollout"]])
    rewards = RewardClient.from_config(config.reward, stack["reward"])
    sampled = sample(config, replicas, rewards, examples, seed=5)
    prompts = inspect_tokens(config, processor, score, examples, sampled)
    page = render_page(prompts, "test", config.objective)

    # The same rows through the objective directly, without the inspection module in between.
    rows, _, _ = rows_with_advantages(
        processor, ScoredBatch(0, examples, sampled.rollouts, sampled.rewards), PASSES, config
    )
    expected = []
    for example in examples:
        own = [row for row in rows if row.prompt_id == example.id]
        batch = collate(own, PASSES, processor.tokenizer.pad_token_id)
        passes = score(batch, PASSES)
        logp = {name: values[0] for name, values in passes.items()}
        entropy = {name: values[1] for name, values in passes.items()}
        inputs = ObjectiveInputs(logp, entropy, logp["clean"], batch.advantages, batch.response_mask)
        tokens = perception_tokens(inputs, config.objective)
        seen: set[tuple[int, ...]] = set()
        for i, row in enumerate(own):
            if tuple(row.response_ids) in seen:  # the page shows identical responses once
                continue
            seen.add(tuple(row.response_ids))
            length = len(row.response_ids)
            expected.append(
                [
                    [
                        bool(tokens.selected[i, t]),
                        bool(tokens.trained[i, t]),
                        logp["clean"][i, t],
                        logp["positive"][i, t],
                        logp["negative"][i, t],
                        tokens.d_positive[i, t],
                        tokens.d_negative[i, t],
                        entropy["clean"][i, t],
                        entropy["negative"][i, t],
                        tokens.entropy_shift[i, t],
                        tokens.contrastive[i, t],
                    ]
                    for t in range(length)
                ]
            )
    parser = NumberTables()
    parser.feed(page)
    assert len(parser.tables) == len(expected) > 0
    for table, want in zip(parser.tables, expected, strict=True):
        header, *rows_shown = table
        assert header[3:] == list(COLUMNS.values())
        assert len(rows_shown) == len(want)
        for shown, values in zip(rows_shown, want, strict=True):
            assert (shown[1] == "yes", shown[2] == "yes") == (values[0], values[1])
            assert [float(cell) for cell in shown[3:]] == pytest.approx(
                [float(v) for v in values[2:]], abs=1e-4
            )
    # The summary's accuracies are the greedy answers the servers scored on each view.
    assert {"I", "I⁺", "I⁻"} <= set(prompts[0].accuracy)


def _prompt(question: str, token: str) -> InspectedPrompt:
    image = encode_image_data_url(Image.new("RGB", (8, 8), (200, 30, 30)))
    values = {key: [0.5, -0.25] for key in COLUMNS}
    response = InspectedResponse(
        text=token + "!", tokens=[token, "!"], reward=1.0, advantage=0.75, values=values,
        selected=[True, True], trained=[True, False],
    )  # fmt: skip
    return InspectedPrompt(
        id="p-1", group="colour", question=question, answer="red", images={"I": image, "I⁻": image},
        recipes={"I⁻": "grey_out seed 3"}, accuracy={"I": 1.0, "I⁺": 1.0, "I⁻": 0.0},
        responses=[response, response],
    )  # fmt: skip


def test_the_page_escapes_what_the_model_and_the_dataset_wrote():
    page = render_page(
        [_prompt("<script>alert(1)</script>?", "<img src=x onerror=alert(2)>")], "t", ObjectiveConfig()
    )
    assert "<script" not in page and "<img src=x" not in page
    assert "&lt;script&gt;" in page and "&lt;img src=x onerror=alert(2)&gt;" in page
    # Nothing is fetched: every image is inline, and no stylesheet or script is linked.
    assert 'src="http' not in page and "<link" not in page
    # Identical responses are shown once with their count; token 0 trains, token 1 is selected but gated.
    assert page.count('class="numbers"') == 1 and "2×" in page
    assert 'class="tok selected"' in page and 'class="tok selected dropped"' in page


@pytest.fixture(scope="module")
def page(stack, tmp_path_factory) -> Path:
    """The page `cppo inspect --run` writes for a run folder, as a user runs it (it starts its own servers):
    the model from the run's latest checkpoint, the settings from its config.yaml."""
    run = tmp_path_factory.mktemp("run")
    policy = run / "checkpoints/step-000007/policy"
    shutil.copytree(stack["model"], policy)
    (policy.parent / "trainer_state.json").write_text('{"step": 7, "policy_version": 8, "data": {}}')
    overrides = [f"data.path={stack['data']}", "rollout.n=2", "rollout.max_tokens=2"]
    config = load_config(REPO / "configs/demo.yaml", overrides)
    (run / "config.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json")))
    done = subprocess.run(
        [sys.executable, "-m", "shared.cli", "inspect", "--run", str(run), "--prompts", "2"],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert str(policy) in (run / "inspect.html").read_text()
    return run / "inspect.html"


def test_cppo_inspect_starts_its_servers_and_writes_the_page(page):
    text = page.read_text()
    assert text.count('class="prompt"') == 2 and text.count("data:image/png;base64,") >= 6


CHROMIUM = Path("/usr/bin/chromium")


@pytest.mark.skipif(
    not CHROMIUM.exists() and not os.environ.get("CPPO_REQUIRE_BROWSER"),
    reason="no Chromium at /usr/bin/chromium: `make setup-browser` installs it",
)
def test_the_page_renders_in_headless_chromium(page, tmp_path):
    from playwright.sync_api import sync_playwright

    problems: list[str] = []
    with sync_playwright() as playwright:
        # No background networking: this machine's closed network refuses Chromium's own connections.
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM),
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"],
        )  # fmt: skip
        view = browser.new_page(viewport={"width": 1200, "height": 900})
        view.on("console", lambda m: problems.append(m.text) if m.type in ("error", "warning") else None)
        view.on("pageerror", lambda error: problems.append(str(error)))
        view.on("requestfailed", lambda request: problems.append(f"failed: {request.url}"))
        view.goto(page.as_uri())
        # The images decoded (data URLs), and a response's numbers open on a click.
        widths = view.eval_on_selector_all("figure img", "images => images.map(i => i.naturalWidth)")
        view.click("details summary")
        opened = view.is_visible("table.numbers")
        shot = tmp_path / "page.png"
        view.screenshot(path=str(shot))
        browser.close()
    assert problems == []
    assert len(widths) >= 6 and min(widths) > 0 and opened
    # Not blank: text, colours and images, not one flat background.
    colours = Image.open(shot).convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "--run RUN_DIR, or --model DIR"),
        (["--run", "/nonexistent"], "not a run folder"),
    ],
)
def test_cppo_inspect_says_what_is_wrong(args, message):
    done = subprocess.run(
        [sys.executable, "-m", "shared.cli", "inspect", *args], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr
