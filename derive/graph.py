"""The derivation as a picture: tensors as nodes (with shapes and gradient formulas), reads as edges.

Two renderers need no dependency: a Mermaid block (GitHub and Jupyter draw it from Markdown) and
a self-contained SVG laid out in layers, forward order top to bottom, whose labels stay text (so
they are searchable and read by screen readers). The same layout is drawn as PNG by matplotlib
when it is installed (``pip install 'derive[plot]'``). ``derive check`` can mark wrong atoms red.
"""

from __future__ import annotations

import html
import textwrap
from dataclasses import dataclass

from .autodiff import grad_name
from .derivation import Derivation
from .indexalg import tensor_names
from .notation import text


@dataclass(frozen=True)
class Node:
    """One tensor: its name, shape, role, and the formula of its gradient."""

    name: str
    shape: str
    role: str  # input, intermediate, output
    gradient: str  # "dx[n, d] = ..." (fused for inputs, the chain's sum for intermediates)


@dataclass(frozen=True)
class Graph:
    """Nodes in forward order and edges ``(read, written)``, one per tensor a statement reads."""

    name: str
    nodes: list[Node]
    edges: list[tuple[str, str]]


def graph_of(d: Derivation) -> Graph:
    """The forward program as a graph, each node labelled with its gradient's formula.

    Example:
        >>> from derive import catalogue, derive
        >>> g = graph_of(derive(catalogue()["linear"]))
        >>> [n.name for n in g.nodes], g.edges[:2]
        (['x', 'W', 'b', 'out'], [('x', 'out'), ('W', 'out')])
    """
    program = d.program
    fused = {g.wrt.name: d.formula(g.wrt.name) for g in d.gradients}
    chain: dict[str, list[str]] = {}
    for step in d.chain:
        chain.setdefault(step.contribution.target.name, []).append(text(step.result))
    nodes = []
    for t in program.inputs:
        formula = fused.get(t.name, "" if t.is_int else f"{grad_name(t.name)} = 0")
        nodes.append(Node(t.name, t.shape_text(), "input", "" if t.is_int else formula))
    for s in program.statements:
        role = "output" if s.name in program.outputs else "intermediate"
        terms = chain.get(s.name)
        lhs = text(s.target.at()).replace(s.name, grad_name(s.name), 1)
        formula = f"{lhs} = {' + '.join(terms)}" if terms else f"{grad_name(s.name)}: given"
        nodes.append(Node(s.name, s.target.shape_text(), role, formula))
    inputs = [t.name for t in program.inputs]
    edges = []
    for s in program.statements:
        order = inputs + [x.name for x in program.statements]
        for name in sorted(tensor_names(s.expr), key=order.index):
            edges.append((name, s.name))
    return Graph(program.name, nodes, edges)


# -- Mermaid ------------------------------------------------------------------------------------
def mermaid(g: Graph, wrong: frozenset[str] = frozenset()) -> str:
    """A ``flowchart TD`` block: GitHub and Jupyter render it in Markdown."""
    lines = ["```mermaid", "flowchart TD"]
    for n in g.nodes:
        label = _mermaid_escape(f"{n.name} [{n.shape}]") + (f"<br/>{_mermaid_escape(n.gradient)}" if n.gradient else "")
        shape = ('(["', '"])') if n.role == "input" else ('["', '"]')
        lines.append(f"    {_id(n.name)}{shape[0]}{label}{shape[1]}")
    for a, b in g.edges:
        lines.append(f"    {_id(a)} --> {_id(b)}")
    for n in g.nodes:
        if n.name in wrong:
            lines.append(f"    style {_id(n.name)} stroke:#c00,stroke-width:3px")
    lines.append("```")
    return "\n".join(lines)


def _id(name: str) -> str:
    return f"n_{name}"


def _mermaid_escape(s: str) -> str:
    """Mermaid's entity codes for what a quoted label cannot hold as is."""
    return s.replace("#", "#35;").replace('"', "#quot;").replace("<", "#lt;").replace(">", "#gt;")


# -- SVG ----------------------------------------------------------------------------------------
CHAR_W, LINE_H, PAD, GAP_X, GAP_Y = 7.0, 16, 8, 24, 44
FILL = {"input": "#e8f0fe", "intermediate": "#ffffff", "output": "#e6f4ea"}
WRAP = 56  # characters per line of a formula
MAX_LINES = 4


def _label(n: Node) -> list[str]:
    lines = [f"{n.name}  [{n.shape}]"]
    if n.gradient:
        wrapped = textwrap.wrap(n.gradient, WRAP, break_on_hyphens=False) or [""]
        if len(wrapped) > MAX_LINES:
            wrapped = wrapped[: MAX_LINES - 1] + [wrapped[MAX_LINES - 1][: WRAP - 1] + "…"]
        lines += wrapped
    return lines


def _layers(g: Graph) -> list[list[Node]]:
    """Each node one layer below the deepest tensor it reads (inputs on top)."""
    depth: dict[str, int] = {}
    reads: dict[str, list[str]] = {}
    for a, b in g.edges:
        reads.setdefault(b, []).append(a)
    for n in g.nodes:
        depth[n.name] = 1 + max((depth[r] for r in reads.get(n.name, [])), default=-1)
    layers: list[list[Node]] = [[] for _ in range(max(depth.values(), default=0) + 1)]
    for n in g.nodes:
        layers[depth[n.name]].append(n)
    return layers


@dataclass(frozen=True)
class Layout:
    """Where each node's box is (``x, top, width, height``), and the drawing's size, in pixels."""

    boxes: dict[str, tuple[float, float, float, float]]
    labels: dict[str, list[str]]
    width: float
    height: float


def layout(g: Graph) -> Layout:
    """Boxes in layers, forward order top to bottom, each layer centred; one layout for every renderer."""
    boxes: dict[str, tuple[float, float, float, float]] = {}
    labels = {n.name: _label(n) for n in g.nodes}
    y = PAD + LINE_H * 2.0
    rows = []
    for layer in _layers(g):
        sizes = [
            (max(len(s) for s in labels[n.name]) * CHAR_W + 2 * PAD, float(len(labels[n.name]) * LINE_H + PAD))
            for n in layer
        ]
        rows.append((layer, sizes, y))
        y += max(h for _, h in sizes) + GAP_Y
    width = max(sum(w for w, _ in sizes) + GAP_X * (len(sizes) - 1) for _, sizes, _ in rows) + 2 * PAD
    for layer, sizes, top in rows:
        x = (width - (sum(w for w, _ in sizes) + GAP_X * (len(sizes) - 1))) / 2
        for n, (w, h) in zip(layer, sizes):
            boxes[n.name] = (x, top, w, h)
            x += w + GAP_X
    return Layout(boxes, labels, width, y - GAP_Y + PAD)


TITLE = "{name}: forward top to bottom; each tensor with the formula of its gradient"


def svg(g: Graph, wrong: frozenset[str] = frozenset()) -> str:
    """A standalone SVG of the graph; nodes in ``wrong`` get a red border."""
    lay = layout(g)
    boxes, labels, width, height = lay.boxes, lay.labels, lay.width, lay.height
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
        f'viewBox="0 0 {width:.0f} {height:.0f}" font-family="DejaVu Sans Mono, Menlo, Consolas, monospace" font-size="12">',
        f"<title>derive: {html.escape(g.name)}, forward top to bottom, each tensor with its gradient</title>",
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" markerHeight="7" '
        'orient="auto-start-reverse"><path d="M 0 0 L 10 5 L 0 10 z" fill="#555"/></marker></defs>',
        '<rect width="100%" height="100%" fill="white"/>',
        f'<text x="{PAD}" y="{PAD + LINE_H}" font-weight="bold">{html.escape(TITLE.format(name=g.name))}</text>',
    ]
    for a, b in g.edges:
        ax, ay, aw, ah = boxes[a]
        bx, by, bw, _ = boxes[b]
        out.append(
            f'<line x1="{ax + aw / 2:.1f}" y1="{ay + ah:.1f}" x2="{bx + bw / 2:.1f}" y2="{by:.1f}" '
            'stroke="#555" stroke-width="1.2" marker-end="url(#arrow)"/>'
        )
    for n in g.nodes:
        x, top, w, h = boxes[n.name]
        stroke = ' stroke="#c00" stroke-width="3"' if n.name in wrong else ' stroke="#333" stroke-width="1"'
        rx = 12 if n.role == "input" else 3
        out.append(f'<g class="node" id="{_id(n.name)}">')
        out.append(
            f'<rect x="{x:.1f}" y="{top:.1f}" width="{w:.1f}" height="{h:.1f}" rx="{rx}" fill="{FILL[n.role]}"{stroke}/>'
        )
        for k, line in enumerate(labels[n.name]):
            weight = ' font-weight="bold"' if k == 0 else ' fill="#333"'
            out.append(
                f'<text x="{x + PAD:.1f}" y="{top + PAD / 2 + LINE_H * (k + 0.8):.1f}"{weight}>{html.escape(line)}</text>'
            )
        out.append("</g>")
    out.append("</svg>")
    return "\n".join(out) + "\n"


def png(g: Graph, wrong: frozenset[str] = frozenset()) -> bytes:
    """The same drawing as :func:`svg`, as PNG bytes, by matplotlib (``pip install 'derive[plot]'``)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.patches import FancyBboxPatch

    lay = layout(g)
    dpi = 100
    fig = plt.figure(figsize=(lay.width / dpi, lay.height / dpi), dpi=dpi)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, lay.width)
    ax.set_ylim(lay.height, 0)
    ax.axis("off")
    font = {"family": "DejaVu Sans Mono", "size": CHAR_W / 0.6 * 72 / dpi}  # a glyph 0.6 em wide: CHAR_W pixels
    ax.text(PAD, PAD + LINE_H, TITLE.format(name=g.name), fontdict=font, weight="bold")
    for a, b in g.edges:
        ax_, ay, aw, ah = lay.boxes[a]
        bx, by, bw, _ = lay.boxes[b]
        ax.annotate(
            "", xy=(bx + bw / 2, by), xytext=(ax_ + aw / 2, ay + ah), arrowprops={"arrowstyle": "->", "color": "#555"}
        )
    for n in g.nodes:
        x, top, w, h = lay.boxes[n.name]
        red = n.name in wrong
        ax.add_patch(
            FancyBboxPatch(
                (x, top),
                w,
                h,
                boxstyle=f"round,pad=0,rounding_size={12 if n.role == 'input' else 3}",
                facecolor=FILL[n.role],
                edgecolor="#c00" if red else "#333",
                linewidth=3 if red else 1,
            )
        )
        for k, line in enumerate(lay.labels[n.name]):
            ax.text(x + PAD, top + PAD / 2 + LINE_H * (k + 0.8), line, fontdict=font, weight="bold" if k == 0 else None)
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=dpi, facecolor="white")
    plt.close(fig)
    return out.getvalue()


class Picture:
    """Shows itself as SVG in Jupyter: ``picture(derive(op))`` as the last line of a cell."""

    def __init__(self, svg_text: str):
        self.svg = svg_text

    def _repr_svg_(self) -> str:
        return self.svg


def picture(d: Derivation, wrong: frozenset[str] = frozenset()) -> Picture:
    """The derivation's graph, for a notebook."""
    return Picture(svg(graph_of(d), wrong))


__all__ = ["Graph", "Layout", "Node", "Picture", "graph_of", "layout", "mermaid", "picture", "png", "svg"]
