"""``detcompile.audit`` and ``detcompile audit``: the first node whose bits for one row change with the batch.

The stock-graph tests rely on measured CPU behaviour (torch 2.13, x86): fp32 ``torch.mm``/``addmm`` give
row 0 of a [1, K] input different bits than the same row inside a [3, K] or [8, K] input, and ATen's
vectorised CPU ``silu`` rounds the scalar tail differently from the vector body, so an element's bits
depend on its offset (a 37-wide row sits at a different offset in each batch).
"""
import pytest
import torch

import detcompile
from detcompile.divergence import AuditResult
from detcompile.cli import main


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(64, 64)
        self.fc2 = torch.nn.Linear(64, 37)

    def forward(self, x):
        return torch.nn.functional.silu(self.fc2(torch.relu(self.fc1(x))))


class Silu(torch.nn.Module):
    def forward(self, x):
        return torch.nn.functional.silu(x) * 2.0


class HeadsAttention(torch.nn.Module):
    """Attention internals as [B * H, L, D]: the audit must slice row r's block of H heads."""

    def forward(self, x):
        b, n, _ = x.shape
        q = x.view(b, n, 4, 8).transpose(1, 2).reshape(b * 4, n, 8)
        w = torch.softmax(torch.bmm(q, q.transpose(1, 2)) * 0.3, -1)
        return torch.bmm(w, q).view(b, 4, n, 8).transpose(1, 2).reshape(b, n, 32)


@pytest.fixture
def mlp():
    torch.manual_seed(0)
    return MLP().eval()


def test_stock_graph_first_divergence_is_the_matmul(mlp, gen):
    torch._dynamo.reset()
    res = detcompile.audit(mlp, torch.randn(1, 64, generator=gen), rewrite=False, verbose=False)
    assert isinstance(res, AuditResult) and not res.ok and res.output_equal is False
    first = res.first_divergence
    assert first is not None
    assert first.op == "aten.addmm.default" and first.node == "addmm"  # fc1, the first op of the graph
    assert first.graph == 0 and first.differs_at and set(first.differs_at) <= {3, 8}
    assert first.n_diff > 0 and first.max_abs_diff > 0
    assert first.output_shapes == {1: [1, 64], 3: [3, 64], 8: [8, 64]}
    assert "test_audit.py" in first.source and "self.fc1(x)" in first.source
    assert first.covered and "'matmul' pass" in first.coverage
    assert first.inputs_equal  # x equal, weight not batch-scaled: the addmm itself is batch-variant
    assert res.counts["divergent"] == len(res.divergences) >= 1
    text = str(res)
    assert "FIRST DIVERGENT NODE" in text and "aten.addmm.default" in text and "test_audit.py" in text


def _silu_tail_values(gen, n):
    """Values whose silu bits differ between ATen's vector body and its scalar tail (about 4% of them)."""
    pool = torch.randn(4096, generator=gen)
    vector = torch.nn.functional.silu(pool)
    scalar = torch.stack([torch.nn.functional.silu(pool[i : i + 1])[0] for i in range(pool.numel())])
    picked = pool[vector != scalar]
    if picked.numel() == 0:
        pytest.skip("this ATen build rounds silu the same in its vector body and scalar tail")
    return picked.repeat(n // picked.numel() + 1)[:n]


def test_stock_graph_finds_cpu_silu_by_offset(gen):
    torch._dynamo.reset()
    # A 37-wide row: its last elements fall in the scalar tail alone, in the vector body inside a batch.
    x = _silu_tail_values(gen, 37)[None]
    res = detcompile.audit(Silu(), x, rewrite=False, verbose=False)
    first = res.first_divergence
    assert first is not None and first.op == "aten.silu.default"
    assert first.covered and "cpu_pointwise" in first.coverage
    assert [d.op for d in res.roots] == ["aten.silu.default"]  # the mul after it only inherits


def test_rewritten_graph_has_no_divergence(mlp, gen, capsys):
    torch._dynamo.reset()
    x = torch.randn(1, 64, generator=gen)
    res = detcompile.audit(mlp, x, rewrite=True, batch_sizes=(1, 3, 8), target_row="last", seed=3)
    assert res.ok and res.first_divergence is None and res.output_equal is True
    assert res.rows == {1: 0, 3: 2, 8: 7}
    assert res.counts["divergent"] == 0 and res.counts["compared"] >= 5
    ops = {op for _, _, op, st in res.node_statuses if st == "equal"}
    assert "detcompile.matmul.default" in ops and "detcompile.cpu_pointwise.default" in ops
    assert "no divergent node" in capsys.readouterr().out  # verbose prints the report


def test_heads_layout_is_sliced_and_graph_breaks_are_aligned(gen):
    torch._dynamo.reset()
    res = detcompile.audit(HeadsAttention(), torch.randn(1, 5, 32, generator=gen), rewrite=True, verbose=False)
    assert res.ok
    compared = {op for _, _, op, st in res.node_statuses if st == "equal"}
    assert "detcompile.matmul.default" in compared and "detcompile.softmax.default" in compared

    class TwoGraphs(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(32, 32), torch.nn.Linear(32, 32)

        def forward(self, x):
            y = self.a(x)
            torch._dynamo.graph_break()
            return torch.sigmoid(self.b(y))

    torch.manual_seed(0)
    model = TwoGraphs().eval()
    x = torch.randn(1, 32, generator=gen)
    stock = detcompile.audit(model, x, rewrite=False, verbose=False)
    assert stock.graphs == {1: 2, 3: 2, 8: 2}
    assert stock.first_divergence.graph == 0 and stock.first_divergence.op == "aten.addmm.default"
    # Graph 1's input inherits graph 0's difference: not counted as a root.
    assert all(d.graph == 0 for d in stock.roots)
    assert detcompile.audit(model, x, rewrite=True, verbose=False).ok


def test_argument_errors():
    m = Silu()
    with pytest.raises(ValueError, match="two positive batch sizes"):
        detcompile.audit(m, torch.randn(1, 4), batch_sizes=(1,), verbose=False)
    with pytest.raises(ValueError, match="leading dim 1"):
        detcompile.audit(m, torch.randn(2, 4), verbose=False)
    with pytest.raises(ValueError, match="out of range"):
        detcompile.audit(m, torch.randn(1, 4), target_row=lambda b: b, verbose=False)
    with pytest.raises(ValueError, match="target_row"):
        detcompile.audit(m, torch.randn(1, 4), target_row="centre", verbose=False)


def test_audit_cli_exit_codes(capsys):
    torch._dynamo.reset()
    assert main(["audit", "--arch", "llama", "--device", "cpu", "--stock", "--seq-len", "5"]) == 1
    out = capsys.readouterr().out
    assert "stock aten graph" in out and "FIRST DIVERGENT NODE" in out
    assert "aten.mm.default" in out and "modeling_llama.py" in out and "'matmul' pass" in out
    assert main(["audit", "--arch", "llama", "--device", "cpu", "--rewritten", "--seq-len", "5"]) == 0
    out = capsys.readouterr().out
    assert "graph after detcompile passes" in out and "no divergent node" in out
