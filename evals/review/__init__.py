"""Blind A/B review: people say whether they can tell a candidate's image from the reference's.

- `votes`: reviews.jsonl in the run directory, one vote a line, written as safely as records (no torch);
- `rates`: per candidate and reviewer, the share of "can't tell", the pick accuracy and the
  indistinguishable rate, each with a 95% Wilson interval, and the samples told apart most (no torch);
- `trials`: which pair each reviewer sees next and on which side, from a seed recorded per reviewer;
- `server`: `evals review RUN_DIR`, the local page that shows the trials and takes the votes.
"""
