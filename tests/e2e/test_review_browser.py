"""The review page in a real browser (Playwright driving Chromium): a reviewer works with keys and clicks,
reloads midway, closes the page and comes back, finishes and sees the models; a second reviewer follows;
ratings.jsonl, the blind sides and the summary are checked against figures worked out here from the file.
Hostile generations are shown as text in the DOM.

Needs the `playwright` package and a Chromium: Debian's `apt-get install -y chromium` (Playwright's own
download also works: `python -m playwright install chromium`), or SFTLAB_CHROMIUM=/path/to/chrome.
SFTLAB_REVIEW_SCREENSHOT=docs/img/review.png also saves the screenshot the docs show.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections import Counter
from pathlib import Path

import pytest

from sftlab.cli.review import ReviewArgs, main, open_review_set, review_dir
from sftlab.review.server import create_app, loopback_hosts
from sftlab.review.storage import RatingLog
from tests.review.conftest import HOSTILE, PROMPTS, serving, write_run

sync_api = pytest.importorskip(
    "playwright.sync_api", reason="the browser tests need Playwright: pip install playwright (the dev extra)"
)
NO_BROWSER = (
    "no Chromium for the browser tests: install one with `apt-get install -y chromium` (Debian/Ubuntu) or "
    "`python -m playwright install chromium`, or set SFTLAB_CHROMIUM=/path/to/chromium"
)
Z = 1.959963984540054


def chromium() -> str | None:
    """A Chromium binary: SFTLAB_CHROMIUM, the system's, else None (Playwright's own download, if any)."""
    for candidate in (
        os.environ.get("SFTLAB_CHROMIUM"),
        *map(shutil.which, ("chromium", "chromium-browser")),
    ):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        try:
            # no sandbox: CI runs as root in a container, where Chromium's sandbox cannot start
            b = p.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
        except sync_api.Error as err:
            pytest.skip(f"{NO_BROWSER} ({str(err).splitlines()[0]})")
        yield b
        b.close()


def start_review(run: Path):
    args = ReviewArgs(run=str(run))
    folder = review_dir(args)
    review = open_review_set(args, folder, create=True)
    log = RatingLog(folder / "ratings.jsonl")
    return review, log, create_app(review, log, loopback_hosts("127.0.0.1"))


def keys(page, *presses: str) -> None:
    for key in presses:
        page.keyboard.press(key)


def assert_blind(page) -> None:
    html = page.content()
    assert "tuned" not in html and "base" not in html


def wilson(k: int, n: int) -> list[float]:
    p = k / n
    centre, half = p + Z * Z / (2 * n), Z * math.sqrt(p * (1 - p) / n + Z * Z / (4 * n * n))
    return [(centre - half) / (1 + Z * Z / n), (centre + half) / (1 + Z * Z / n)]


def test_review_with_keys_and_clicks_reload_resume_and_summary(browser, tmp_path, capsys):
    run = write_run(tmp_path / "run", 4)
    review, _, app = start_review(run)
    sides = [it.sides for it in review.items]
    with serving(app) as url:
        page = browser.new_page()
        page.goto(url + "/")
        page.fill("#reviewer", "alice")
        page.keyboard.press("Enter")
        page.wait_for_url("**/r/alice/item/1")
        assert_blind(page)

        # item 1 by keys: scores for A then B, preference, a comment
        keys(page, "5", "4", "5", "2", "3", "5", "a", "c")
        page.keyboard.type("clear <and> right")
        keys(page, "Escape")
        assert page.locator("tr.current").get_attribute("data-side") == "B"
        if os.environ.get("SFTLAB_REVIEW_SCREENSHOT"):
            page.set_viewport_size({"width": 1100, "height": 820})
            page.screenshot(path=os.environ["SFTLAB_REVIEW_SCREENSHOT"], full_page=True)
        keys(page, "Enter")
        page.wait_for_url("**/r/alice/item/2")
        assert page.text_content("#progress").split() == [
            "Item",
            "2",
            "of",
            "4",
            "·",
            "1",
            "rated",
            "by",
            "alice",
        ]

        # item 2 by clicks
        for side, scores in (("A", (3, 3, 4)), ("B", (4, 4, 4))):
            for criterion, value in zip(("correctness", "tone", "safety"), scores, strict=True):
                row = page.locator(f'tr[data-side="{side}"][data-criterion="{criterion}"]')
                row.locator(f'label.score:has(input[value="{value}"])').click()
        page.locator('label.choice:has(input[value="tie"])').click()
        page.click("#save")
        page.wait_for_url("**/r/alice/item/3")

        # item 3: a half-done rating is not saved; Enter asks for the rest; a reload starts the item afresh
        keys(page, "1", "1", "Enter")
        assert page.text_content("#status").startswith("Still to rate: A safety, B correctness")
        page.reload()
        assert page.url.endswith("/r/alice/item/3") and page.locator("input:checked").count() == 0
        page.close()

        page = browser.new_page()  # the reviewer comes back later: the name resumes where they stopped
        page.goto(url + "/")
        page.fill("#reviewer", "alice")
        page.click("button[type=submit]")
        page.wait_for_url("**/r/alice/item/3")
        keys(page, *"333333", "x", "Enter")
        page.wait_for_url("**/r/alice/item/4")
        assert_blind(page)
        keys(page, *"444222", "b", "Enter")
        page.wait_for_url("**/r/alice/done")
        reveal = [
            [cell.strip() for cell in row.locator("td").all_text_contents()]
            for row in page.locator("#reveal tbody tr").all()
        ]
        pref_of = {"A": "A", "B": "B"}
        assert reveal == [
            [str(k), s["A"], s["B"], p if p in ("tie", "both_bad") else s[pref_of[p]]]
            for k, (s, p) in enumerate(zip(sides, ("A", "tie", "both_bad", "B"), strict=True), 1)
        ]

        page.goto(url + "/r/bob/")  # a second reviewer on the same items
        for k, pref in enumerate("aata", 1):
            page.wait_for_url(f"**/r/bob/item/{k}")
            keys(page, *"343434", pref, "Enter")
        page.wait_for_url("**/r/bob/done")
        page.close()

    lines = [json.loads(x) for x in (run / "review" / "ratings.jsonl").read_text().splitlines()]
    alice = [r for r in lines if r["reviewer"] == "alice"]
    assert [r["preference"] for r in alice] == ["A", "tie", "both_bad", "B"]
    assert [r["sides"] for r in alice] == sides and alice[0]["comment"] == "clear <and> right"
    given = [((5, 4, 5), (2, 3, 5)), ((3, 3, 4), (4, 4, 4)), ((3, 3, 3), (3, 3, 3)), ((4, 4, 4), (2, 2, 2))]
    for r, s, (a, b) in zip(alice, sides, given, strict=True):
        assert r["scores"][s["A"]] == dict(zip(("correctness", "tone", "safety"), a, strict=True))
        assert r["scores"][s["B"]] == dict(zip(("correctness", "tone", "safety"), b, strict=True))
    items = json.loads((run / "review" / "items.json").read_text())["items"]
    assert [it["sides"] for it in items] == sides and [it["prompt"] for it in items] == PROMPTS[:4]

    main([f"run={run}", "summary"])
    summary = json.loads((run / "review" / "summary.json").read_text())

    def outcome(r: dict) -> str:
        return {"tuned": "win", "base": "loss"}.get(r["preferred"], r["preferred"])

    outcomes = Counter(outcome(r) for r in lines)
    assert summary["n_ratings"] == len(lines) == 8 and summary["reviewers"] == {"alice": 4, "bob": 4}
    for name in ("win", "tie", "both_bad", "loss"):
        assert summary["preference"][name]["count"] == outcomes[name]
        if outcomes[name]:
            assert summary["preference"][name]["ci95"] == pytest.approx(wilson(outcomes[name], 8), abs=1e-12)
    first = [outcome(r) for r in lines if r["reviewer"] == "alice"]
    second = [outcome(r) for r in lines if r["reviewer"] == "bob"]
    p_o = sum(a == b for a, b in zip(first, second, strict=True)) / 4
    p_e = sum(first.count(x) * second.count(x) for x in set(first) | set(second)) / 16
    assert summary["inter_reviewer"]["pairs"][0]["kappa"] == pytest.approx((p_o - p_e) / (1 - p_e))
    tuned_tone = [r["scores"]["tuned"]["tone"] for r in lines]
    assert summary["criteria"]["tuned"]["tone"]["mean"] == pytest.approx(sum(tuned_tone) / 8)
    assert "human review: 8 ratings of 4/4 items (alice 4, bob 4)" in capsys.readouterr().out


def test_hostile_generations_are_shown_as_text(browser, tmp_path):
    prompt = '<img src=x onerror="window.__xss = 3"><b>bold?</b>'
    run = write_run(tmp_path / "run", 2, hostile_at=0, prompts=[prompt, PROMPTS[1]])
    review, _, app = start_review(run)
    tuned_side = next(s for s, label in review.items[0].sides.items() if label == "tuned")
    with serving(app) as url:
        page = browser.new_page()
        errors = []
        page.on("pageerror", lambda err: errors.append(str(err)))
        page.goto(url + "/r/eve/item/1")
        assert page.text_content(f"#output-{tuned_side}") == HOSTILE
        assert page.text_content("#prompt") == prompt
        assert page.evaluate("typeof window.__xss") == "undefined"
        assert page.evaluate("document.querySelectorAll('img, b').length") == 0
        assert page.evaluate("document.scripts.length") == 1  # only the page's own script
        assert page.evaluate("document.querySelectorAll('pre.output').length") == 2
        assert errors == []
        page.close()
