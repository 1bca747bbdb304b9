"""The review web app (Starlette) and its server (uvicorn) on loopback.

Routes: `/` (enter a name), `/start?reviewer=NAME`, `/r/NAME/` (resume: the first item NAME has not rated),
`/r/NAME/item/K` (item K, 1-based), `POST /r/NAME/rate` (one rating as JSON; answered only after the line is
on disk), `/r/NAME/done` (the reveal: which model was A and B, once every item is rated), `/static/...`.

Resuming needs no session state: a reviewer's progress is what `ratings.jsonl` holds for their name.
"""

from __future__ import annotations

import logging
import socket
from collections import Counter
from datetime import datetime, timezone
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route

from sftlab.review import pages
from sftlab.review.items import PREFERENCES, REVIEWER, SIDES, ReviewSet
from sftlab.review.storage import RatingLog

log = logging.getLogger(__name__)

MAX_COMMENT = 5000
PREFERENCE_TEXT = (("A", "A is better", "a"), ("B", "B is better", "b"), ("tie", "Tie", "t"))
PREFERENCE_TEXT += (("both_bad", "Both bad", "x"),)
SECURITY_HEADERS = {
    # No inline script or style at all: model text can never run, even if an escape were missed.
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


class BadRating(ValueError):
    """A rating the page should not have sent: answered with 400 and nothing written."""


def _html(text: str, status: int = 200) -> HTMLResponse:
    return HTMLResponse(text, status_code=status, headers=SECURITY_HEADERS)


def validate(review: ReviewSet, reviewer: str, body: Any) -> dict:
    """The JSON the page posts -> the line ratings.jsonl stores (scores keyed by model label)."""
    if not isinstance(body, dict):
        raise BadRating("expected a JSON object")
    item = review.by_id().get(str(body.get("item")))
    if item is None:
        raise BadRating(f"no item {body.get('item')!r}")
    lo, hi = review.rubric.scale
    scores = body.get("scores")
    if not isinstance(scores, dict):
        raise BadRating("'scores' must be an object with A and B")
    by_label = {}
    for side in SIDES:
        given = scores.get(side)
        if not isinstance(given, dict):
            raise BadRating(f"no scores for answer {side}")
        side_scores = {}
        for name in review.rubric.criteria:
            value = given.get(name)
            if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
                raise BadRating(f"answer {side} {name}: give a whole number from {lo} to {hi}")
            side_scores[name] = value
        by_label[item.sides[side]] = side_scores
    preference = body.get("preference")
    if preference not in PREFERENCES:
        raise BadRating(f"preference must be one of {', '.join(PREFERENCES)}")
    comment = body.get("comment") or ""
    if not isinstance(comment, str) or len(comment) > MAX_COMMENT:
        raise BadRating(f"comment: text of at most {MAX_COMMENT} characters")
    return {
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "reviewer": reviewer,
        "item": item.id,
        "index": item.index,
        "sides": dict(item.sides),
        "seed": review.seed,
        "scores": by_label,
        "preference": preference,
        "preferred": item.sides.get(preference, preference),
        "comment": comment.strip(),
    }


def create_app(review: ReviewSet, ratings: RatingLog, allowed_hosts: list[str] | None = None) -> Starlette:
    """The review app over one review set and its rating file. `allowed_hosts` guards against DNS rebinding
    (a web page elsewhere reaching the loopback server under its own host name)."""
    total = len(review.items)
    lo, hi = review.rubric.scale

    def next_position(reviewer: str) -> int | None:
        """1-based position of the first item the reviewer has not rated; None when all are."""
        rated = ratings.rated(reviewer)
        return next((k for k, it in enumerate(review.items, 1) if it.id not in rated), None)

    def next_url(reviewer: str) -> str:
        k = next_position(reviewer)
        return f"/r/{reviewer}/done" if k is None else f"/r/{reviewer}/item/{k}"

    def reviewer_of(request: Request) -> str | Response:
        name = request.path_params["reviewer"]
        if not REVIEWER.fullmatch(name):
            return PlainTextResponse("A reviewer name is 1-40 letters, digits, _ . or -.", status_code=404)
        return name

    async def index(request: Request) -> Response:
        counts = Counter(r["reviewer"] for r in ratings.latest() if r["item"] in review.by_id())
        return _html(pages.render("index.html", n_items=total, reviewers=sorted(counts.items())))

    async def start(request: Request) -> Response:
        name = request.query_params.get("reviewer", "").strip()
        if not REVIEWER.fullmatch(name):
            return RedirectResponse("/", status_code=303)
        return RedirectResponse(f"/r/{name}/", status_code=303)

    async def resume(request: Request) -> Response:
        name = reviewer_of(request)
        if isinstance(name, Response):
            return name
        return RedirectResponse(next_url(name), status_code=303)

    async def item_page(request: Request) -> Response:
        name = reviewer_of(request)
        if isinstance(name, Response):
            return name
        position = request.path_params["position"]
        if not 1 <= position <= total:
            return RedirectResponse(next_url(name), status_code=303)
        item = review.items[position - 1]
        rated = ratings.rated(name)
        earlier = item.history[:-1] if item.history and item.history[-1]["content"] == item.prompt else []
        return _html(
            pages.render(
                "item.html",
                reviewer=name,
                position=position,
                total=total,
                rated=len(rated & set(review.by_id())),
                already=item.id in rated,
                item_id=item.id,
                earlier=earlier,
                prompt=item.prompt,
                reference=item.reference,
                sides=SIDES,
                outputs={s: item.output(s) for s in SIDES},
                criteria=list(review.rubric.criteria.items()),
                scale=range(lo, hi + 1),
                lo=lo,
                hi=hi,
                preferences=PREFERENCE_TEXT,
            )
        )

    async def rate(request: Request) -> Response:
        name = reviewer_of(request)
        if isinstance(name, Response):
            return name
        try:
            rating = validate(review, name, await request.json())
        except ValueError as err:  # BadRating, and JSONDecodeError for a body that is not JSON
            return JSONResponse({"ok": False, "error": str(err)}, status_code=400)
        ratings.append(rating)
        return JSONResponse({"ok": True, "next": next_url(name)}, headers={"Cache-Control": "no-store"})

    async def done(request: Request) -> Response:
        name = reviewer_of(request)
        if isinstance(name, Response):
            return name
        if next_position(name) is not None:  # the names stay hidden until every item is rated
            return RedirectResponse(next_url(name), status_code=303)
        mine = {r["item"]: r for r in ratings.latest() if r["reviewer"] == name}
        rows = [
            {"position": k, "A": it.sides["A"], "B": it.sides["B"], "preferred": mine[it.id]["preferred"]}
            for k, it in enumerate(review.items, 1)
        ]
        tally = Counter(row["preferred"] for row in rows)
        order = [*review.labels, "tie", "both_bad"]
        return _html(
            pages.render(
                "done.html", reviewer=name, total=total, rows=rows, tally=[(k, tally[k]) for k in order]
            )
        )

    async def script(request: Request) -> Response:
        return Response(pages.SCRIPT, media_type="text/javascript", headers={"Cache-Control": "no-cache"})

    async def style(request: Request) -> Response:
        return Response(pages.STYLE, media_type="text/css", headers={"Cache-Control": "no-cache"})

    routes = [
        Route("/", index),
        Route("/start", start),
        Route("/r/{reviewer}/", resume),
        Route("/r/{reviewer}/item/{position:int}", item_page),
        Route("/r/{reviewer}/rate", rate, methods=["POST"]),
        Route("/r/{reviewer}/done", done),
        Route("/static/review.js", script),
        Route("/static/review.css", style),
    ]
    middleware = [Middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts or ["*"])]
    return Starlette(routes=routes, middleware=middleware, max_body_size=1 << 20)


def loopback_hosts(host: str) -> list[str] | None:
    """Host names a browser may use to reach `host`; None (any) for a wildcard bind."""
    if host in ("0.0.0.0", "::", ""):
        return None
    return sorted({host, "127.0.0.1", "localhost", "[::1]"})


def bind(host: str, port: int, backlog: int = 128) -> socket.socket:
    """A listening socket (port 0: a free one), bound before the URL is printed so the URL is usable.
    `backlog`: connections the kernel queues before resetting new ones (sftlab-serve wants a deep one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(backlog)
    return sock


def serve(app: Starlette, sock: socket.socket) -> None:
    """Serve on an already bound socket until interrupted (Ctrl-C)."""
    import uvicorn

    uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False)).run(sockets=[sock])


def url_of(sock: socket.socket, host: str) -> str:
    port = sock.getsockname()[1]
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"
