"""The review page's HTML (Jinja2, autoescaped), its script and its style sheet.

Model text reaches the page only through autoescaped `{{ ... }}` into `<pre>` elements, and the script never
writes HTML (no innerHTML), so a generation is always shown as text. The script and styles are served as
files so the Content-Security-Policy can forbid inline script altogether: even a missed escape runs nothing.
Nothing on an item page names a model: the page knows only sides A and B.
"""

from __future__ import annotations

from jinja2 import DictLoader, Environment, select_autoescape

BASE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{% block title %}sftlab review{% endblock %}</title>
<link rel="stylesheet" href="/static/review.css"></head>
<body>{% block body %}{% endblock %}
<script src="/static/review.js"></script></body></html>
"""

INDEX = """{% extends "base.html" %}{% block body %}
<main class="narrow">
<h1>sftlab review</h1>
<p>{{ n_items }} prompts, two answers each, shown blind: which model wrote which answer is drawn at random
per item and revealed when you finish.</p>
<form method="get" action="/start" class="start">
<label for="reviewer">Your name</label>
<input id="reviewer" name="reviewer" required pattern="[A-Za-z0-9][A-Za-z0-9_.\\-]{0,39}" autofocus
  placeholder="letters, digits, _ . -">
<button type="submit">Start or resume</button>
</form>
{% if reviewers %}<h2>Reviewers so far</h2><ul class="reviewers">
{% for name, count in reviewers %}
<li><a href="/r/{{ name }}/">{{ name }}</a>: {{ count }} / {{ n_items }}</li>
{% endfor %}</ul>{% endif %}
</main>{% endblock %}
"""

ITEM = """{% extends "base.html" %}
{% block title %}Item {{ position }} of {{ total }} - sftlab review{% endblock %}
{% block body %}
<header>
<div class="progress-text" id="progress">Item {{ position }} of {{ total }} · {{ rated }} rated by
{{ reviewer }}</div>
<progress id="progress-bar" max="{{ total }}" value="{{ rated }}"></progress>
{% if already %}<div class="note" id="already">You rated this item before; saving again replaces that rating.
</div>{% endif %}
</header>
<main>
<section class="prompt">
{% for turn in earlier %}<div class="turn"><span class="role">{{ turn.role }}</span>
<pre class="text">{{ turn.content }}</pre></div>{% endfor %}
<div class="turn"><span class="role">prompt</span><pre class="text" id="prompt">{{ prompt }}</pre></div>
{% if reference %}<details class="reference" open><summary>Reference answer</summary>
<pre class="text" id="reference">{{ reference }}</pre></details>{% endif %}
</section>
<form id="rating" data-action="/r/{{ reviewer }}/rate" data-item="{{ item_id }}"
  data-lo="{{ lo }}" data-hi="{{ hi }}" autocomplete="off">
<div class="answers">
{% for side in sides %}<section class="answer" id="answer-{{ side }}">
<h2>Answer {{ side }}</h2>
<pre class="text output" id="output-{{ side }}">{{ outputs[side] }}</pre>
<table class="rubric">
{% for name, question in criteria %}<tr class="criterion" data-side="{{ side }}" data-criterion="{{ name }}">
<th title="{{ question }}">{{ name }}</th><td>
{% for v in scale %}<label class="score"><input type="radio" name="{{ side }}.{{ name }}" value="{{ v }}">
<span>{{ v }}</span></label>{% endfor %}</td></tr>
{% endfor %}</table>
</section>{% endfor %}
</div>
<fieldset class="preference"><legend>Which answer is better?</legend>
{% for value, text, key in preferences %}<label class="choice"><input type="radio" name="preference"
  value="{{ value }}"><span>{{ text }} <kbd>{{ key }}</kbd></span></label>{% endfor %}
</fieldset>
<label class="comment" for="comment">Comment (optional) <kbd>c</kbd></label>
<textarea id="comment" name="comment" rows="2" maxlength="5000"></textarea>
<div class="actions"><button type="submit" id="save">Save and next <kbd>Enter</kbd></button>
<span id="status" role="status"></span></div>
</form>
<p class="keys">Keys: <kbd>{{ lo }}</kbd>–<kbd>{{ hi }}</kbd> score the highlighted criterion and move on ·
<kbd>←</kbd> <kbd>→</kbd> move the highlight ·
<kbd>a</kbd> <kbd>b</kbd> <kbd>t</kbd> tie <kbd>x</kbd> both bad ·
<kbd>c</kbd> comment (<kbd>Esc</kbd> leaves it, <kbd>Ctrl</kbd>+<kbd>Enter</kbd> saves from it) ·
<kbd>Enter</kbd> save.
{% if position > 1 %}
<a href="/r/{{ reviewer }}/item/{{ position - 1 }}" id="previous">previous item</a>{% endif %}
</p>
</main>{% endblock %}
"""

DONE = """{% extends "base.html" %}{% block title %}Done - sftlab review{% endblock %}{% block body %}
<main class="narrow">
<h1>Thank you, {{ reviewer }}</h1>
<p id="done">You rated all {{ total }} items. The models behind A and B were:</p>
<table class="reveal" id="reveal"><thead><tr><th>item</th><th>A</th><th>B</th><th>you preferred</th></tr>
</thead><tbody>
{% for row in rows %}<tr><td>{{ row.position }}</td><td>{{ row.A }}</td><td>{{ row.B }}</td>
<td>{{ row.preferred }}</td></tr>{% endfor %}
</tbody></table>
<p id="tally">{% for name, count in tally %}{{ name }}: {{ count }}{% if not loop.last %} · {% endif %}
{% endfor %}</p>
<p>The summary over all reviewers: <code>sftlab-review ... summary</code>.</p>
</main>{% endblock %}
"""

SCRIPT = r"""(() => {
  "use strict";
  const form = document.getElementById("rating");
  if (!form) return;
  const rows = Array.from(form.querySelectorAll("tr.criterion"));
  const lo = Number(form.dataset.lo), hi = Number(form.dataset.hi);
  const status = document.getElementById("status");
  const comment = document.getElementById("comment");
  let cursor = 0, saving = false;

  const show = () => rows.forEach((r, i) => r.classList.toggle("current", i === cursor));
  const score = (row, value) => {
    const input = row.querySelector('input[value="' + value + '"]');
    if (input) input.checked = true;
  };
  const firstOpen = () => {
    const i = rows.findIndex((r) => !r.querySelector("input:checked"));
    return i < 0 ? rows.length - 1 : i;
  };
  rows.forEach((row, i) => row.addEventListener("change", () => {
    cursor = Math.min(i + 1, rows.length - 1);
    show();
  }));
  const choose = (value) => {
    form.querySelector('input[name="preference"][value="' + value + '"]').checked = true;
  };

  const collect = () => {
    const scores = {A: {}, B: {}};
    const missing = [];
    rows.forEach((row) => {
      const checked = row.querySelector("input:checked");
      if (checked) scores[row.dataset.side][row.dataset.criterion] = Number(checked.value);
      else missing.push(row.dataset.side + " " + row.dataset.criterion);
    });
    const pref = form.querySelector('input[name="preference"]:checked');
    if (!pref) missing.push("which answer is better");
    return {missing, body: {item: form.dataset.item, scores, preference: pref && pref.value,
                            comment: comment.value}};
  };

  const save = async () => {
    if (saving) return;
    const {missing, body} = collect();
    if (missing.length) {
      status.textContent = "Still to rate: " + missing.join(", ");
      status.className = "error";
      return;
    }
    saving = true;
    status.textContent = "Saving…";
    status.className = "";
    try {
      const resp = await fetch(form.dataset.action, {
        method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)});
      const reply = await resp.json();
      if (!resp.ok || !reply.ok) throw new Error(reply.error || ("HTTP " + resp.status));
      status.textContent = "Saved.";
      window.location.assign(reply.next);
    } catch (err) {
      saving = false;
      status.textContent = "Not saved: " + err.message;
      status.className = "error";
    }
  };

  form.addEventListener("submit", (e) => { e.preventDefault(); save(); });
  document.addEventListener("keydown", (e) => {
    if (e.target === comment) {
      if (e.key === "Escape") comment.blur();
      else if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); save(); }
      return;
    }
    if (e.ctrlKey || e.metaKey || e.altKey) return;
    const digit = Number(e.key);
    if (e.key.length === 1 && e.key >= "0" && e.key <= "9" && digit >= lo && digit <= hi) {
      score(rows[cursor], digit);
      cursor = Math.min(cursor + 1, rows.length - 1);
      if (rows.every((r) => r.querySelector("input:checked"))) cursor = rows.length - 1;
      else if (rows[cursor].querySelector("input:checked")) cursor = firstOpen();
    } else if (e.key === "ArrowRight" || e.key === "ArrowDown") {
      cursor = Math.min(cursor + 1, rows.length - 1);
    } else if (e.key === "ArrowLeft" || e.key === "ArrowUp") {
      cursor = Math.max(cursor - 1, 0);
    } else if (e.key === "a" || e.key === "A") choose("A");
    else if (e.key === "b" || e.key === "B") choose("B");
    else if (e.key === "t") choose("tie");
    else if (e.key === "x") choose("both_bad");
    else if (e.key === "c") { e.preventDefault(); comment.focus(); }
    else if (e.key === "Enter") { e.preventDefault(); save(); }
    else return;
    e.preventDefault();
    show();
  });
  show();
})();
"""

STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 0; color: #1d1d1f; background: #f6f6f4; }
header { position: sticky; top: 0; background: #fff; border-bottom: 1px solid #ddd; padding: .5rem 1rem;
  z-index: 1; }
main { padding: 1rem; max-width: 1300px; margin: 0 auto; }
main.narrow { max-width: 720px; }
progress { width: 100%; height: .5rem; }
.note { color: #8a5300; }
pre.text { white-space: pre-wrap; word-break: break-word; margin: .25rem 0; font: 14px/1.4 ui-monospace,
  monospace; background: #fff; border: 1px solid #ddd; border-radius: 4px; padding: .5rem; }
.role { font-size: 12px; text-transform: uppercase; color: #666; }
.reference summary { cursor: pointer; color: #555; }
.answers { display: grid; grid-template-columns: 1fr 1fr; gap: 1rem; margin-top: 1rem; }
.answer { background: #fff; border: 1px solid #ccc; border-radius: 6px; padding: .5rem 1rem; }
.answer h2 { margin: .25rem 0; font-size: 1.05rem; }
.rubric { border-collapse: collapse; margin-top: .5rem; }
.rubric th { text-align: left; font-weight: 500; padding-right: 1rem; }
.rubric tr.current { outline: 2px solid #2b6cb0; background: #ebf4ff; }
.score input, .choice input { position: absolute; opacity: 0; }
.score span, .choice span { display: inline-block; min-width: 1.8rem; text-align: center;
  padding: .15rem .4rem; margin: .1rem; border: 1px solid #aaa; border-radius: 4px; cursor: pointer;
  background: #fafafa; }
.score input:checked + span, .choice input:checked + span { background: #2b6cb0; color: #fff;
  border-color: #2b6cb0; }
.score input:focus-visible + span, .choice input:focus-visible + span { outline: 2px solid #f6ad55; }
.preference { margin: 1rem 0 .5rem; border: 1px solid #ccc; border-radius: 6px; background: #fff; }
.comment { display: block; margin-top: .5rem; }
textarea { width: 100%; box-sizing: border-box; font: inherit; }
.actions { margin-top: .5rem; display: flex; gap: 1rem; align-items: center; }
button { font: inherit; padding: .35rem .9rem; }
#status.error { color: #b00020; }
kbd { font: 11px ui-monospace, monospace; border: 1px solid #bbb; border-bottom-width: 2px;
  border-radius: 3px; padding: 0 .25rem; background: #fff; color: #333; }
.keys { color: #555; font-size: 13px; }
.reveal td, .reveal th { border: 1px solid #ccc; padding: .2rem .6rem; }
.reveal { border-collapse: collapse; background: #fff; }
"""

env = Environment(
    loader=DictLoader({"base.html": BASE, "index.html": INDEX, "item.html": ITEM, "done.html": DONE}),
    autoescape=select_autoescape(default=True, default_for_string=True),
)


def render(name: str, **context) -> str:
    return env.get_template(name).render(**context)
