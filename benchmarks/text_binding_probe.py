"""Does a shapes model's text tower say which colour goes on top? For two-shape captions "a C1 S1 above|below
a C2 S2" (every pair of six colours, every ordered pair of four shapes, both orders, both relation words:
720 captions), a linear probe (logistic regression, L2 1e-3, on standardised features plus the colour pair
one-hot; two thirds of the captions to fit, the rest held out, the four captions of one pair of colours and
of shapes on the same side) reads from the tower's states:

- "order": which of the two colours is named first -- a fact of the words alone;
- "on top": which colour the caption puts on top -- the order and the relation word together (their XOR).

Cross-attention that averages token states linearly can pass on only what such a probe reads. The probe
is read from the mean of the caption's token states, from [CLS], and from the first colour's and first
noun's tokens.

    python benchmarks/text_binding_probe.py NAME=MODEL [NAME=MODEL ...]
"""

import itertools
import random
import sys

import torch
import torch.nn.functional as F

from ldmkit.checkpoints.single_file import load_model

COLOURS = ["red", "blue", "green", "yellow", "purple", "orange"]
SHAPES = ["circle", "square", "triangle", "star"]


def captions() -> list[tuple[str, int, int, int]]:
    """(caption, colour pair index, 1 if the pair's first colour is named first, 1 if it is on top), in
    groups of four (one pair of colours and of shapes, both orders, both relation words) kept together, the
    groups shuffled: a probe held out on a group has seen none of its four captions."""
    groups = []
    for p, (a, b) in enumerate(itertools.combinations(COLOURS, 2)):
        for s1, s2 in itertools.permutations(SHAPES, 2):
            group = []
            for first, second in ((a, b), (b, a)):
                for relation in ("above", "below"):
                    top = first if relation == "above" else second
                    group.append((f"a {first} {s1} {relation} a {second} {s2}", p, int(first == a), int(top == a)))
            groups.append(group)
    random.Random(0).shuffle(groups)
    return [row for group in groups for row in group]


def probe(features: torch.Tensor, labels: torch.Tensor) -> float:
    """Held-out accuracy of an L2-regularised logistic regression (the last third of the groups held out)."""
    n = len(features) // 12 * 8  # two thirds of the groups of four
    x = (features - features[:n].mean(0)) / (features[:n].std(0) + 1e-6)
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=300)

    def closure():
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(x[:n] @ w + b, labels[:n]) + 1e-3 * w.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    return (((x[n:] @ w + b) > 0).float() == labels[n:]).float().mean().item()


@torch.no_grad()
def states(model, texts: list[str]) -> dict[str, torch.Tensor]:
    te = model.text_encoder
    tokens = te.tokenizer(texts)
    ctx = te.encode_ids(tokens["input_ids"], tokens["attention_mask"])
    mask = tokens["attention_mask"].float()[..., None]
    # tokens: [CLS] a C1 S1 ...: the first colour is token 2, the first noun token 3
    return {"mean": (ctx * mask).sum(1) / mask.sum(1), "[CLS]": ctx[:, 0], "colour 1": ctx[:, 2], "noun 1": ctx[:, 3]}


def main(specs: list[str]) -> None:
    rows = captions()
    pair = F.one_hot(torch.tensor([r[1] for r in rows]), 15).float()
    order, top = (torch.tensor([r[i] for r in rows]).float() for i in (2, 3))
    print("| model | order: mean / [CLS] / colour 1 / noun 1 | on top: mean / [CLS] / colour 1 / noun 1 |")
    print("|---|---|---|")
    for spec in specs:
        name, path = spec.split("=", 1)
        feats = states(load_model(path).eval(), [r[0] for r in rows])
        cells = [
            " / ".join(f"{100 * probe(torch.cat([f, pair], 1), labels):.0f}%" for f in feats.values())
            for labels in (order, top)
        ]
        print(f"| {name} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
