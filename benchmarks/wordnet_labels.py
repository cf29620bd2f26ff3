"""Argmax accuracy of the wordnet-labels stage on the synthetic dataset, split by the generator's noun relation.

Usage: python benchmarks/wordnet_labels.py [key=value overrides of params.yaml] (after `grounding run prepare` and
`grounding run wordnet-labels` with the same overrides)."""
from __future__ import annotations

import argparse
from collections import Counter

import numpy as np
from grounding import config as C
from grounding.data.schema import CanonicalDataset
from grounding.data.synthetic import NOUNS
from grounding.shards import ShardSet


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of params.yaml")
    args = ap.parse_args()
    p = C.load("params.yaml", args.overrides)
    ds = CanonicalDataset.load(p.prepared_dir())
    s = ShardSet(p.teacher_dir("wordnet-labels"))
    classes = s.manifest.extra["classes"]
    rel = {(n.noun, n.cls): n.relation for n in NOUNS}
    nouns = sorted({n.noun for n in NOUNS}, key=len, reverse=True)
    tot, ok = Counter(), Counter()
    for r in ds.refs:  # GT categories are read here for evaluation only
        row = s[r.ref_id]
        lab = row["label"].astype(np.float32)
        gt = classes.index(r.category)
        correct = lab.max() > 0 and (lab == lab.max()).sum() == 1 and lab.argmax() == gt
        text = r.text.lower()
        # the target's noun: the first NOUNS noun (longest first) of the target's class appearing in the text
        cands = [(text.find(n), n) for n in nouns if (n, r.category) in rel and f" {n}" in f" {text}"]
        noun = min(cands)[1] if cands else "?"
        k = rel.get((noun, r.category), "?")
        tot[k] += 1; ok[k] += correct
    for k in sorted(tot):
        print(f"{k:9} {ok[k]:5}/{tot[k]:5} = {ok[k]/tot[k]:.3f}")
    print(f"all       {sum(ok.values()):5}/{sum(tot.values()):5} = {sum(ok.values())/sum(tot.values()):.3f}")


if __name__ == "__main__":
    main()
