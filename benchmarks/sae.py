"""Benchmark of the SAE hot paths (issue 5), every figure measured in this one run.

    python benchmarks/sae.py                     # CPU, batch 2048, d_in 512, d_sae 16384, k in [34, 306]
    python benchmarks/sae.py --device cuda       # the same on a GPU (more repeats)

Prints, with interleaved repeats (min and median):

* AdaptiveK ``encode`` vs TopK(k = the batch's largest k) ``encode`` (target <= 1.1x);
* AdaptiveK ``encode`` vs the reference code's per-row ``torch.topk`` loop;
* one full training step (forward, backward, decoder-gradient projection, clipping, Adam, decoder
  renorm) in units of one dense ``B x d_in x d_sae`` matmul timed in the same run: ours and a naive
  dense-autograd step, without dead latents and with 10 % dead (AuxK active) (target <= 3 units);
* peak memory of a training step: ``torch.cuda.max_memory_allocated`` on a GPU; on CPU the peak resident
  size during the step (the kernel's VmHWM, reset just before it) over the resident size before it, in
  a fresh subprocess per step kind (``ru_maxrss`` if the reset is not available).

The probe is fitted on synthetic vectors whose complexity spans [0, 10], so with the paper's map
(k_min 20, k_max 320, steepness 6) the batch's k covers [34, 306].
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from adaptivek.probe import RidgeProbe
from adaptivek.sae import AdaptiveKSAE, SparseAutoencoder, TopKSAE
from adaptivek.training import TrainConfig, make_adam


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def setup(args: argparse.Namespace, device: torch.device):
    """Batch x [B, d_in], a fitted probe whose predictions span [0, 10], and the two SAEs (same weights)."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(max(args.batch, 1024), args.d_in, generator=g)
    w = torch.randn(args.d_in, generator=g) / args.d_in**0.5
    y = (5 + 2.5 * (X @ w)).clamp(0, 10)  # labels cover [0, 10]
    probe = RidgeProbe.fit(X[:1024], y[:1024], lambdas=(1.0,), folds=2)
    ada = AdaptiveKSAE(args.d_in, args.d_sae, probe, k_min=args.k_min, k_max=args.k_max, seed=0).to(device)
    x = X[: args.batch].to(device)
    with torch.no_grad():
        k = ada.encode_sparse(x).k  # the probe's k of each row
    top = TopKSAE(args.d_in, args.d_sae, int(k.max()), seed=0).to(device)
    top.load_state_dict(ada.state_dict())
    return x, k, ada, top


def reference_loop_encode(sae: SparseAutoencoder, x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The reference code's encoder: dense ReLU pre-activations, then one torch.topk per row."""
    post = F.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc)
    out = torch.zeros_like(post)
    for i, (row, k_i) in enumerate(zip(post, k.tolist(), strict=True)):
        v, j = row.topk(k_i)
        out[i].scatter_(-1, j, v)
    return out


class NaiveDense(torch.nn.Module):
    """Dense-autograd SAE step: dense pre-activations, dense codes, dense decoder, autograd backward."""

    def __init__(self, sae: SparseAutoencoder) -> None:
        super().__init__()
        self.W_enc = torch.nn.Parameter(sae.W_enc.detach().contiguous().clone())
        self.b_enc = torch.nn.Parameter(sae.b_enc.detach().clone())
        self.W_dec = torch.nn.Parameter(sae.W_dec.detach().clone())
        self.b_dec = torch.nn.Parameter(sae.b_dec.detach().clone())

    def loss(self, x: torch.Tensor, k: torch.Tensor, dead: torch.Tensor | None) -> torch.Tensor:
        pre = F.relu((x - self.b_dec) @ self.W_enc + self.b_enc)  # [B, d_sae]
        vals, idx = pre.topk(int(k.max()), dim=1)
        mask = torch.arange(vals.shape[1], device=x.device) < k[:, None]
        codes = torch.zeros_like(pre).scatter(1, idx, vals * mask)
        x_hat = codes @ self.W_dec + self.b_dec
        loss = (x_hat - x).pow(2).mean() + 0.005 * codes.sum(1).mean() / x.norm(dim=1).mean()
        if dead is not None and dead.any():
            e = (x - x_hat).detach()
            av, ai = torch.where(dead[None], pre, -torch.inf).topk(min(x.shape[1] // 2, int(dead.sum())), dim=1)
            aux_hat = torch.zeros_like(pre).scatter(1, ai, av) @ self.W_dec
            loss = loss + ((aux_hat - e).pow(2).sum(1).mean() / (e - e.mean(0)).pow(2).sum(1).mean()) / 32
        return loss


def _adam(params: list[torch.Tensor]) -> torch.optim.Adam:
    """Adam with its state already allocated (a zero-gradient step), so a timed step does not include it."""
    opt = make_adam(params, 1e-3)
    for q in params:
        q.grad = torch.zeros_like(q)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return opt


def make_step(kind: str, ada: AdaptiveKSAE, x: torch.Tensor, k: torch.Tensor, dead: torch.Tensor | None
              ) -> Callable[[], None]:
    """One full training step of ``ours`` (the library path) or ``naive`` (dense autograd), on its own copy."""
    if kind == "ours":
        sae = SparseAutoencoder.from_config(ada.cfg, device=x.device)
        sae.probe = ada.probe
        sae.load_state_dict(ada.state_dict())
        opt = _adam(list(sae.parameters()))
        cfg = TrainConfig()  # the reference's loss weights: L1 0.005, AuxK 1/32

        def step() -> None:
            out = sae(x, dead_mask=dead)  # k from the probe, as in training: the fused sparse path
            loss = sae.loss(out, cfg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            sae.remove_gradient_parallel_to_decoder_directions()
            torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
            opt.step()
            sae.set_decoder_norm_to_unit_norm()
        return step
    naive = NaiveDense(ada).to(x.device)
    opt = _adam(list(naive.parameters()))

    def step() -> None:
        loss = naive.loss(x, k, dead)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            W, gW = naive.W_dec, naive.W_dec.grad
            gW -= (gW * W).sum(1, keepdim=True) * W / W.pow(2).sum(1, keepdim=True)
        torch.nn.utils.clip_grad_norm_(naive.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            naive.W_dec /= naive.W_dec.norm(dim=1, keepdim=True)
    return step


def dead_mask(d_sae: int, frac: float, device: torch.device) -> torch.Tensor | None:
    if frac <= 0:
        return None
    mask = torch.zeros(d_sae, dtype=torch.bool)
    mask[torch.randperm(d_sae, generator=torch.Generator().manual_seed(1))[: int(frac * d_sae)]] = True
    return mask.to(device)


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def memory_child(args: argparse.Namespace) -> None:
    """(Subprocess) peak RSS growth of one training step over the resident size just before it.

    The kernel's high-water mark (VmHWM) is reset right before the step (``/proc/self/clear_refs``), so
    set-up transients do not count; without that interface ``ru_maxrss`` is used (then set-up peaks may hide
    a smaller step peak, which the output flags).
    """
    device = torch.device("cpu")
    x, k, ada, _ = setup(args, device)
    step = make_step(args.memory_child, ada, x, k, dead_mask(args.d_sae, args.dead_frac, device))
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak-RSS counter
        reset = True
    except OSError:
        reset = False
    before = _status_bytes("VmRSS")
    step()
    peak = _status_bytes("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"before": before, "peak": peak, "reset": reset}))


def measure_memory(args: argparse.Namespace, kind: str, frac: float, device: torch.device,
                   ada: AdaptiveKSAE, x: torch.Tensor, k: torch.Tensor) -> tuple[float, float]:
    """(extra MiB during a step, absolute peak MiB) for one step kind (Adam's state exists before it)."""
    if device.type == "cuda":
        step = make_step(kind, ada, x, k, dead_mask(args.d_sae, frac, device))
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        return (peak - before) / 2**20, peak / 2**20
    cmd = [sys.executable, __file__, "--memory-child", kind, "--dead-frac", str(frac), "--threads=1"] + [
        f"--{n.replace('_', '-')}={getattr(args, n)}" for n in ("batch", "d_in", "d_sae", "k_min", "k_max")]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
    r = json.loads(out)
    if not r["reset"]:
        print("  (could not reset the peak-RSS counter: figures are upper bounds set by start-up)")
    return (r["peak"] - r["before"]) / 2**20, r["peak"] / 2**20


def report(times: dict[str, list[float]]) -> None:
    """The table of timings and the ratios against their targets."""
    unit_min, unit_med = min(times["dense matmul B x d_in x d_sae"]), statistics.median(times["dense matmul B x d_in x d_sae"])
    print(f"\n{'case':44s} {'min s':>9s} {'median s':>9s} {'min/matmul':>11s} {'med/matmul':>11s}")
    for name, ts in times.items():
        print(f"{name:44s} {min(ts):9.4f} {statistics.median(ts):9.4f} {min(ts) / unit_min:11.2f} "
              f"{statistics.median(ts) / unit_med:11.2f}")

    def ratio(a: str, b: str) -> str:
        return f"{min(times[a]) / min(times[b]):.2f}x (min) / {statistics.median(times[a]) / statistics.median(times[b]):.2f}x (median)"

    print("\nAdaptiveK encode / TopK(k_max) encode:      ", ratio("AdaptiveK encode", "TopK encode (k = k_max)"), "  target <= 1.1x")
    print("per-row loop encode / AdaptiveK encode:      ", ratio("reference per-row loop encode", "AdaptiveK encode"))
    for tag in ("no dead latents", "10% dead (AuxK)"):
        ours, naive = f"train step, ours, {tag}", f"train step, naive dense, {tag}"
        print(f"train step ({tag}), dense-matmul units:".ljust(46),
              f"ours {min(times[ours]) / unit_min:.2f} (min) / {statistics.median(times[ours]) / unit_med:.2f} (median), "
              f"naive {min(times[naive]) / unit_min:.2f} / {statistics.median(times[naive]) / unit_med:.2f}   target <= 3")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=2048)
    p.add_argument("--d-in", type=int, default=512)
    p.add_argument("--d-sae", type=int, default=16384)
    p.add_argument("--k-min", type=int, default=20)
    p.add_argument("--k-max", type=int, default=320)
    p.add_argument("--repeats", type=int, default=None, help="interleaved repeats (default: 3 on CPU, 20 on GPU)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall: elapsed time; cpu: this process's CPU time (steadier on a shared CPU machine)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--dead-frac", type=float, default=0.0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        return memory_child(args)
    device = torch.device(args.device)
    repeats = args.repeats or (20 if device.type == "cuda" else 3)
    if args.clock == "cpu" and device.type == "cuda":
        raise SystemExit("--clock cpu measures CPU work; on a GPU use the default wall clock")
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    x, k, ada, top = setup(args, device)
    print(f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else f'{torch.get_num_threads()} threads'}), "
          f"torch {torch.__version__}; batch {args.batch}, d_in {args.d_in}, d_sae {args.d_sae}; AdaptiveK k in "
          f"[{int(k.min())}, {int(k.max())}] (mean {k.float().mean():.0f}); TopK k = {top.k}; {repeats} interleaved repeats, "
          f"{args.clock} clock")

    W = ada.W_enc.detach()
    cases: dict[str, Callable[[], object]] = {
        "dense matmul B x d_in x d_sae": lambda: x @ W,
        "TopK encode (k = k_max)": lambda: top.encode(x),
        "AdaptiveK encode": lambda: ada.encode(x),
        "reference per-row loop encode": lambda: reference_loop_encode(ada, x, k),
    }
    for frac in (0.0, 0.1):
        tag = "no dead latents" if frac == 0 else f"{frac:.0%} dead (AuxK)"
        cases[f"train step, ours, {tag}"] = make_step("ours", ada, x, k, dead_mask(args.d_sae, frac, device))
        cases[f"train step, naive dense, {tag}"] = make_step("naive", ada, x, k, dead_mask(args.d_sae, frac, device))

    with torch.no_grad():  # correctness before speed: the three encoders agree
        ref = reference_loop_encode(ada, x, k)
        assert torch.equal(ada.encode(x), ref), "AdaptiveK encode differs from the per-row loop"
    times: dict[str, list[float]] = {name: [] for name in cases}
    for rep in range(repeats + 1):  # the first round warms up and is not counted
        for name, fn in cases.items():
            grad = torch.enable_grad() if name.startswith("train") else torch.no_grad()
            with grad:
                _sync(device)
                t0 = clock()
                fn()
                _sync(device)
                if rep:
                    times[name].append(clock() - t0)

    report(times)
    if not args.no_memory:
        print("\npeak memory of one training step (" + ("torch.cuda.max_memory_allocated" if device.type == "cuda"
              else "peak RSS, reset just before the step, over the RSS before it; fresh subprocess, 1 thread") + "):")
        for kind in ("ours", "naive"):
            for frac in (0.0, 0.1):
                extra, peak = measure_memory(args, kind, frac, device, ada, x, k)
                print(f"  {kind:6s} dead {frac:4.0%}: +{extra:7.0f} MiB during the step (absolute peak {peak:.0f} MiB)")


if __name__ == "__main__":
    main()
