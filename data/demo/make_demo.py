#!/usr/bin/env python
"""Deterministic generator for the DreamPRM-DS demo data set.

Writes, under ``--out`` (default: the folder holding this script):

* ``images/*.png`` -- 56x56 RGB images, each showing 1-5 red/green/blue
  circles and squares on white, placed on a 3x3 grid.
* ``train.json``   -- lower-level (domain-reweighted) training records, one
  per step prefix of a simulated chain of thought, in four domains that
  differ only in label quality:

  - ``clean``:    the simulated Monte Carlo accuracy of the prefix;
  - ``noisy_30``: 30% of the labels replaced by the label of a random record of the domain;
  - ``noisy_80``: 80% of the labels replaced likewise;
  - ``inverted``: 1 - the true label.

* ``meta.json``    -- upper-level (meta) records: question + whole chain,
  with a clean ``true_false`` label, balanced 32 true / 32 false.
* ``candidates.json`` -- Best-of-N evaluation set: 24 questions, each with
  N=4 candidate chains (1-3 of them correct) and the ground truth.

Questions are about the image ("How many red shapes are in the image?",
"Are there more circles than squares?", ...).  A simulated policy writes
2-4 step chains ("Step 1: ...\\nStep 2: ...\\nFinal answer: X"); in an
erroneous chain one step is wrong and every later step (and the final
answer) follows from the wrong value.  Most wrong steps are visible in the
text as well: a listed count that does not match the stated number, an
arithmetic slip ("2 + 1 = 4"), a false comparison ("1 > 2"), or a
contradiction of an earlier step; a minority are pure perception errors
(the listing itself misdescribes the image).  The Monte Carlo accuracy of
a prefix is simulated with 16 rollouts: high (typically 0.7-1.0) when the
prefix is right, low (typically 0-0.2) when it contains a wrong step.

Everything is derived from ``--seed`` with ``random.Random`` (seeded with
strings, so independent of PYTHONHASHSEED) and PIL; JSON is written with
sorted keys and fixed formatting, so re-running gives byte-identical files.

Usage::

    python data/demo/make_demo.py [--out data/demo] [--seed 0]
"""

import argparse
import json
import os
import random

from PIL import Image, ImageDraw

IMG_SIZE = 56
CENTERS = (10, 28, 46)  # 3x3 grid of cell centres (pixels)
HALF = 7  # shapes are 15x15 pixels
LOCATIONS = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)
COLORS = {"red": (220, 30, 30), "green": (30, 160, 30), "blue": (30, 60, 220)}
COLOR_NAMES = ("red", "green", "blue")
KINDS = ("circle", "square")

DOMAINS = ("clean", "noisy_30", "noisy_80", "inverted")
CHAINS_PER_DOMAIN = 30
N_META = 64
N_CAND_QUESTIONS = 24
N_CANDIDATES = 4

HEDGES = ("I am not sure, but ", "Maybe ", "Probably ")
P_HEDGE_WRONG = 0.85  # policy: chance that a wrong step is hedged
P_HEDGE_RIGHT = 0.05  # policy: chance that a right step is hedged
P_CHAIN_ERROR = 0.62  # policy: probability that a training chain contains a wrong step (this centres the
#                      Monte Carlo labels near 0.5, as the meta labels are, so label bias does not
#                      dominate the hypergradient and the inverted domain keeps the same mean)
ROLLOUTS = 16  # Monte Carlo rollouts per prefix
P_ROLLOUT_STEP_ERROR = 0.05  # rollouts from a right prefix: per-step error
P_ROLLOUT_LAST = 0.98  # ... and chance the final answer is read off right
P_RECOVER = 0.06  # rollouts from a wrong prefix: chance of a right answer


# --------------------------------------------------------------------------
# scenes and images
# --------------------------------------------------------------------------

def make_scene(rng):
    """A scene: list of (cell, color, kind), sorted by cell."""
    k = rng.randint(1, 5)
    cells = sorted(rng.sample(range(9), k))
    return [(c, rng.choice(COLOR_NAMES), rng.choice(KINDS)) for c in cells]


def draw_scene(scene, rng):
    img = Image.new("RGB", (IMG_SIZE, IMG_SIZE), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for cell, color, kind in scene:
        cx = CENTERS[cell % 3] + rng.randint(-1, 1)
        cy = CENTERS[cell // 3] + rng.randint(-1, 1)
        box = (cx - HALF, cy - HALF, cx + HALF, cy + HALF)
        if kind == "circle":
            draw.ellipse(box, fill=COLORS[color])
        else:
            draw.rectangle(box, fill=COLORS[color])
    return img


def matching_cells(scene, color=None, kind=None):
    return [c for c, col, k in scene
            if (color is None or col == color) and (kind is None or k == kind)]


# --------------------------------------------------------------------------
# questions
# --------------------------------------------------------------------------

def noun(color, kind, n):
    """'red circle(s)', 'circle(s)', 'red shape(s)'."""
    base = kind if kind is not None else "shape"
    if n != 1:
        base += "s"
    return base if color is None else color + " " + base


def make_question(scene, rng):
    """Returns (question, plan, ground_truth).

    plan = {"obs": [(color, kind), ...], "combine": ("sum"|"compare"|"exists",
    extra)}: one observation step per (color, kind) category, then one
    combining step.
    """
    qtype = rng.choice(("color_count", "shape_count", "compare", "exists",
                        "total"))
    if qtype == "color_count":
        color = rng.choice(COLOR_NAMES)
        kinds = list(KINDS)
        rng.shuffle(kinds)
        obs = [(color, k) for k in kinds]
        q = "How many %s shapes are in the image?" % color
        combine = ("sum", (color, None))
        gt = str(len(matching_cells(scene, color=color)))
    elif qtype == "shape_count":
        kind = rng.choice(KINDS)
        obs = [(c, kind) for c in COLOR_NAMES]
        q = "How many %ss are in the image?" % kind
        combine = ("sum", (None, kind))
        gt = str(len(matching_cells(scene, kind=kind)))
    elif qtype == "total":
        kinds = list(KINDS)
        rng.shuffle(kinds)
        obs = [(None, k) for k in kinds]
        q = "How many shapes are in the image?"
        combine = ("sum", (None, None))
        gt = str(len(scene))
    elif qtype == "compare":
        obs = [(None, "circle"), (None, "square")]
        q = "Are there more circles than squares in the image?"
        combine = ("compare", None)
        n_c = len(matching_cells(scene, kind="circle"))
        n_s = len(matching_cells(scene, kind="square"))
        gt = "Yes" if n_c > n_s else "No"
    else:  # exists
        color = rng.choice(COLOR_NAMES)
        kind = rng.choice(KINDS)
        obs = [(color, kind)]
        q = "Is there a %s %s in the image?" % (color, kind)
        combine = ("exists", (color, kind))
        gt = "Yes" if matching_cells(scene, color=color, kind=kind) else "No"
    return q, {"obs": obs, "combine": combine}, gt


# --------------------------------------------------------------------------
# chains (simulated policy)
# --------------------------------------------------------------------------

def listing(cells):
    if not cells:
        return "none"
    parts = ["one at the " + LOCATIONS[c] for c in cells]
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def obs_text(color, kind, cells, n, rng):
    plural = noun(color, kind, 2)
    lst = listing(cells)
    t = rng.randrange(3)
    if t == 0:
        return "I look for %s: I see %s. That makes %d %s." % (
            plural, lst, n, noun(color, kind, n))
    if t == 1:
        return "Counting %s, I find %s. So there %s %d %s." % (
            plural, lst, "is" if n == 1 else "are", n, noun(color, kind, n))
    return "%s in the image: %s. That is %d %s." % (
        plural[0].upper() + plural[1:], lst, n, noun(color, kind, n))


def combine_answer(kind, extra, values):
    """Correct answer of the combining step applied to the given values."""
    if kind == "sum":
        return str(sum(values))
    if kind == "compare":
        return "Yes" if values[0] > values[1] else "No"
    return "Yes" if values[0] > 0 else "No"


def combine_text(kind, extra, values, answer, rng):
    """Text of the combining step that uses `values` and concludes `answer`
    (which may not follow from `values`: an arithmetic/logic slip)."""
    if kind == "sum":
        color, knd = extra
        expr = " + ".join(str(v) for v in values)
        t = int(answer)
        if len(values) == 1:
            expr = str(values[0])
        if rng.randrange(2) == 0:
            return "So there are %s = %d %s." % (expr, t, noun(color, knd, t))
        return "Adding up, %s = %d, so the image has %d %s." % (
            expr, t, t, noun(color, knd, t))
    if kind == "compare":
        a, b = values
        yes = answer == "Yes"
        if yes:
            rel = ">"  # false when a <= b (a slip)
        elif a > b:
            rel = rng.choice(("<", "="))  # slip: a false relation
        else:
            rel = "=" if a == b else "<"
        return "%d %s %d, so there %s more circles than squares." % (
            a, rel, b, "are" if yes else "are not")
    color, knd = extra
    n = values[0]
    if answer == "Yes":
        return "%d > 0, so there is a %s %s." % (n, color, knd)
    return "%d = 0, so there is no %s %s." % (n, color, knd)


def wrong_value_choices(plan, true_vals, idx):
    """Values v' != true_vals[idx] for observation step idx such that the
    chain's correct continuation from v' gives a wrong final answer."""
    kind = plan["combine"][0]
    cur = true_vals[idx]
    out = []
    for v in range(0, 7):
        if v == cur or abs(v - cur) > 3:
            continue
        vals = list(true_vals)
        vals[idx] = v
        if combine_answer(kind, None, vals) != combine_answer(
                kind, None, true_vals):
            out.append(v)
    return out


def make_chain(scene, plan, rng, error):
    """Simulate one chain.

    error: None for a fully correct chain, else True (choose a wrong step at
    random).  Returns (steps, final_answer, err_step) with err_step the
    0-based index of the wrong step or None.
    """
    obs = plan["obs"]
    ckind, cextra = plan["combine"]
    n_steps = len(obs) + 1
    true_cells = [matching_cells(scene, color=c, kind=k) for c, k in obs]
    true_vals = [len(c) for c in true_cells]

    err_step = None
    wrong_obs_val = None
    if error:
        cand = [i for i in range(len(obs))
                if wrong_value_choices(plan, true_vals, i)]
        # wrong step chosen uniformly among all steps (when possible)
        choices = cand + [len(obs)]
        err_step = rng.choice(choices)
        if err_step < len(obs):
            wrong_obs_val = rng.choice(
                wrong_value_choices(plan, true_vals, err_step))

    steps = []
    stated = []
    for i, (color, kind) in enumerate(obs):
        cells = list(true_cells[i])
        n = len(cells)
        if i == err_step:
            if rng.random() < 0.6:
                # counting slip: listing right, stated number wrong
                n = wrong_obs_val
            else:
                # perception error: listing misdescribes the image
                n = wrong_obs_val
                if n < len(cells):
                    cells = sorted(rng.sample(cells, n))
                else:
                    others = [c for c in range(9) if c not in cells]
                    cells = sorted(cells + rng.sample(others, n - len(cells)))
        rng.shuffle(cells)
        steps.append(obs_text(color, kind, cells, n, rng))
        stated.append(n)

    # combining step
    values = list(stated)
    if err_step == len(obs):
        truth = combine_answer(ckind, cextra, values)
        if rng.random() < 0.5:
            # slip: right inputs, wrong conclusion
            if ckind == "sum":
                s = sum(values)
                opts = [v for v in range(max(0, s - 2), s + 3) if v != s]
                answer = str(rng.choice(opts))
            else:
                answer = "No" if truth == "Yes" else "Yes"
        else:
            # contradiction: one earlier value restated differently
            js = [k for k in range(len(values))
                  if wrong_value_choices(plan, values, k)]
            if js:
                j = rng.choice(js)
                values[j] = rng.choice(wrong_value_choices(plan, values, j))
                answer = combine_answer(ckind, cextra, values)
            elif ckind == "sum":  # cannot happen; fall back to a slip
                answer = str(sum(values) + 1)
            else:
                answer = "No" if truth == "Yes" else "Yes"
    else:
        answer = combine_answer(ckind, cextra, values)
    steps.append(combine_text(ckind, cextra, values, answer, rng))
    assert len(steps) == n_steps
    # The simulated policy often hedges when it is guessing: a lexical cue a small model can pick
    # up in minutes on a CPU. Right steps hedge too, rarely, so the cue is informative, not exact.
    for i in range(n_steps):
        if rng.random() < (P_HEDGE_WRONG if i == err_step else P_HEDGE_RIGHT):
            steps[i] = rng.choice(HEDGES) + steps[i][0].lower() + steps[i][1:]
    return steps, answer, err_step


def chain_text(steps, answer):
    lines = ["Step %d: %s" % (i + 1, s) for i, s in enumerate(steps)]
    return "\n".join(lines) + "\nFinal answer: " + answer


def mc_accuracy(n_steps, sid, err_step, rng):
    """Simulated Monte Carlo estimate for the prefix with steps 1..sid."""
    if err_step is not None and err_step < sid:
        p = P_RECOVER
    else:
        p = P_ROLLOUT_LAST * (1.0 - P_ROLLOUT_STEP_ERROR) ** (n_steps - sid)
    hits = sum(rng.random() < p for _ in range(ROLLOUTS))
    return hits / ROLLOUTS


def sample_chain(scene, plan, gt, rng, correct):
    steps, answer, err = make_chain(scene, plan, rng, error=not correct)
    assert (answer == gt) == correct, (steps, answer, gt)
    return steps, answer, err


# --------------------------------------------------------------------------
# writers
# --------------------------------------------------------------------------

def new_item(rng, out, name):
    """A scene + question; saves its image; returns a dict."""
    scene = make_scene(rng)
    q, plan, gt = make_question(scene, rng)
    rel = "images/%s.png" % name
    draw_scene(scene, rng).save(os.path.join(out, rel), format="PNG")
    return {"scene": scene, "question": q, "plan": plan, "gt": gt,
            "image_path": rel}


def apply_noise(domain, records, rng):
    """Corrupt the labels of one domain in place.

    A noisy label is the true label of another record of the same domain, drawn at random: the
    label distribution stays the same and only the information is destroyed. (Uniform random
    values would pull scores towards 0.5 like label smoothing, which a meta objective can prefer.)
    """
    if domain == "clean":
        return
    if domain == "inverted":
        for r in records:
            r["accuracy"] = 1.0 - r["accuracy"]
        return
    frac = {"noisy_30": 0.3, "noisy_80": 0.8}[domain]
    pool = [r["accuracy"] for r in records]
    for r in records:
        if rng.random() < frac:
            r["accuracy"] = rng.choice(pool)


def build_train(seed, out):
    records = []
    for domain in DOMAINS:
        rng = random.Random("%s/train/%s" % (seed, domain))
        noise_rng = random.Random("%s/noise/%s" % (seed, domain))
        first = len(records)
        for i in range(CHAINS_PER_DOMAIN):
            cid = "%s-%03d" % (domain, i)
            item = new_item(rng, out, "train_%s_%03d" % (domain, i))
            correct = rng.random() >= P_CHAIN_ERROR
            steps, _, err = sample_chain(item["scene"], item["plan"],
                                         item["gt"], rng, correct)
            for sid in range(1, len(steps) + 1):
                acc = mc_accuracy(len(steps), sid, err, rng)
                prefix = "\n".join("Step %d: %s" % (k + 1, s)
                                   for k, s in enumerate(steps[:sid]))
                records.append({
                    "id": cid,
                    "sid": sid,
                    "input": item["question"],
                    "add": prefix,
                    "image_path": item["image_path"],
                    "dataset": domain,
                    "accuracy": acc,
                    "ground_truth": item["gt"],
                })
        apply_noise(domain, records[first:], noise_rng)
    return records


def build_meta(seed, out):
    rng = random.Random("%s/meta" % seed)
    flags = [True] * (N_META // 2) + [False] * (N_META - N_META // 2)
    rng.shuffle(flags)
    records = []
    for i, ok in enumerate(flags):
        item = new_item(rng, out, "meta_%03d" % i)
        steps, answer, _ = sample_chain(item["scene"], item["plan"],
                                        item["gt"], rng, ok)
        records.append({
            "id": "meta-%03d" % i,
            "input": item["question"] + "\n\n" + chain_text(steps, answer),
            "image_path": item["image_path"],
            "true_false": ok,
        })
    return records


def build_candidates(seed, out):
    rng = random.Random("%s/candidates" % seed)
    records = []
    for i in range(N_CAND_QUESTIONS):
        item = new_item(rng, out, "cand_%03d" % i)
        n_ok = rng.randint(1, N_CANDIDATES - 1)
        flags = [True] * n_ok + [False] * (N_CANDIDATES - n_ok)
        rng.shuffle(flags)
        cands, seen = [], set()
        for ok in flags:
            for _ in range(50):  # prefer distinct texts
                steps, answer, _ = sample_chain(item["scene"], item["plan"],
                                                item["gt"], rng, ok)
                text = chain_text(steps, answer)
                if text not in seen:
                    break
            seen.add(text)
            cands.append({"text": text, "correct": ok})
        records.append({
            "id": "cand-%03d" % i,
            "image_path": item["image_path"],
            "question": item["question"],
            "candidates": cands,
            "ground_truth": item["gt"],
        })
    return records


def write_json(path, obj):
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=True))
        f.write("\n")


def main(argv=None):
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=here, help="output folder")
    ap.add_argument("--seed", default=0, type=int)
    args = ap.parse_args(argv)

    img_dir = os.path.join(args.out, "images")
    os.makedirs(img_dir, exist_ok=True)
    # drop stale images from a previous run of this generator
    for name in sorted(os.listdir(img_dir)):
        if name.endswith(".png") and name.split("_")[0] in (
                "train", "meta", "cand"):
            os.remove(os.path.join(img_dir, name))

    train = build_train(args.seed, args.out)
    meta = build_meta(args.seed, args.out)
    cands = build_candidates(args.seed, args.out)
    write_json(os.path.join(args.out, "train.json"), train)
    write_json(os.path.join(args.out, "meta.json"), meta)
    write_json(os.path.join(args.out, "candidates.json"), cands)

    counts = {}
    for r in train:
        counts[r["dataset"]] = counts.get(r["dataset"], 0) + 1
    print("train records: %d %s" % (len(train), json.dumps(counts,
                                                          sort_keys=True)))
    print("meta records: %d (%d true)" % (
        len(meta), sum(r["true_false"] for r in meta)))
    print("candidate questions: %d x %d" % (len(cands), N_CANDIDATES))


if __name__ == "__main__":
    main()
