"""Blind side-by-side human review of two models' answers (base vs tuned, or run vs run).

items (the review set: pairs, blind sides, rubric), storage (ratings.jsonl, append-only), summary (win rates
with confidence intervals, kappa, agreement with the LLM judge, CSV), pages + server (the web page).
No model is loaded here: `sftlab.cli.review` produces any missing generations and hands over the rows.
"""
