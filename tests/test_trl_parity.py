"""Numeric parity with TRL 1.16.0 on identical inputs (summed and per-token log-probs, masks,
scores): our DPO, IPO and conservative DPO (rlhf_jax/rl/dpo.py), and GRPO's group advantages
(GRPO, Dr. GRPO, batch scaling, RLOO) and per-token clipped losses (rlhf_jax/rl/grpo.py).

Where the convention is the same, ours equals TRL's within 1e-5. Where it differs, the test
asserts the documented relation (README, "Coming from TRL"):
  - IPO: ours builds z from SUMMED log-ratios (the paper), TRL's `ipo` from token-AVERAGED ones:
    ours on length-averaged log-probs equals TRL's.
  - label smoothing: TRL 1.16's `sigmoid` ignores it; ours is conservative DPO, which is TRL's
    `aot` formula on a single pair; TRL's `robust` is (cDPO + 2 eps log s(-z)) / (1 - 2 eps).
  - the std's epsilon: TRL adds 1e-4, we add 1e-6 (`group_advantages(eps=1e-4)` is TRL's).
  - TRL's default `use_bias_correction_kl` multiplies k3 by the ratio: equal values on-policy.
TRL's RLOO loss uses a sequence-level ratio (ours is per token): only its advantages are compared.

How TRL's code runs here: its losses are inline in trainer methods, and importing a trainer module
imports transformers' Trainer stack (about 10 s of CPU, the whole budget of this file). So each
TRL method (or block of statements in one) is compiled from the installed trl 1.16.0 source as it
stands, found by class and name with `ast`, keeping TRL's file and line numbers, and called on a
stand-in `self` that holds the attributes it reads. Only torch is imported.
"""

import ast
import collections
import functools
import math
import pathlib
import types
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

trl = pytest.importorskip("trl")
torch = pytest.importorskip("torch")

from rlhf_jax.rl import dpo, grpo  # noqa: E402

if trl.__version__ != "1.16.0":
    pytest.skip(f"parity is pinned to trl 1.16.0, found {trl.__version__}", allow_module_level=True)

TRAINER = pathlib.Path(trl.__file__).parent / "trainer"
N, G, T = 3, 4, 7  # prompts, samples per prompt, completion slots
LENGTHS = (1, 7, 3, 5, 2, 6, 7, 4, 1, 3, 5, 2)  # ragged completion lengths, B = N * G


@functools.cache
def _parse(module):
    path = TRAINER / f"{module}.py"
    return str(path), ast.parse(path.read_text())


def _method(tree, cls, name):
    scope = tree.body
    if cls is not None:
        scope = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls).body
    return next(n for n in scope if isinstance(n, ast.FunctionDef) and n.name == name)


def _run(path, nodes, namespace):
    exec(compile(ast.Module(body=nodes, type_ignores=[]), path, "exec"), namespace)
    return namespace


@functools.cache
def trl_utils():
    """TRL's nanstd / nanmin / nanmax (trl/trainer/utils.py)."""
    path, tree = _parse("utils")
    ns = _run(
        path, [_method(tree, None, n) for n in ("nanstd", "nanmin", "nanmax")], {"torch": torch}
    )
    return {n: ns[n] for n in ("nanstd", "nanmin", "nanmax")}


@functools.cache
def trl_method(module, cls, name):
    """TRL's `cls.name` as a plain function of (self, ...)."""
    path, tree = _parse(module)
    glob = {"torch": torch, "F": torch.nn.functional, "math": math, "warnings": warnings}
    return _run(path, [_method(tree, cls, name)], glob | trl_utils())[name]


def trl_block(module, cls, name, first, last, **local):
    """Runs the statements of `cls.name` from the one whose source starts with `first` through
    the one starting with `last` (one statement list), with `local` as its variables."""
    path, tree = _parse(module)
    for node in ast.walk(_method(tree, cls, name)):
        body = getattr(node, "body", None)
        if not isinstance(body, list):
            continue
        src = [ast.unparse(s) for s in body]
        starts = [i for i, s in enumerate(src) if s.startswith(first)]
        ends = [i for i, s in enumerate(src) if s.startswith(last)]
        if starts and ends:
            return _run(
                path, body[starts[0] : ends[-1] + 1], {"torch": torch} | trl_utils() | local
            )
    raise AssertionError(f"{first!r} .. {last!r} not found in {cls}.{name}: not trl 1.16's source?")


class Accelerator:
    """One process: gathers and reductions are the identity."""

    device, num_processes, sync_gradients = "cpu", 1, True

    def gather(self, x):
        return x

    gather_for_metrics = gather

    def reduce(self, x, reduction="sum"):
        return x


def metrics_dict():
    return collections.defaultdict(lambda: collections.defaultdict(list))


def close(ours, theirs, tol=1e-5):
    np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=tol, atol=tol)


# ---------------------------------------------------------------- DPO, IPO, conservative DPO

P, L = 5, 9  # pairs; prompt + completion slots of a row


@pytest.fixture(scope="module")
def pairs():
    """P pairs as TRL lays them out ([chosen; rejected] rows, per-token log-probs at the shifted
    positions, 0 off the completion) and as we do (summed log-probs [P, 2], winner first)."""
    rng = np.random.default_rng(0)
    mask = np.zeros((2 * P, L), np.float32)
    lens = rng.integers(1, L - 2, 2 * P)
    for i, n in enumerate(lens):
        mask[i, L - n :] = 1  # completion after a prompt of at least 2 tokens
    tok_lp = np.where(mask[:, 1:] > 0, rng.normal(-2, 1, (2 * P, L - 1)), 0).astype(np.float32)
    summed = tok_lp.sum(1)  # [2P]
    ref = (summed + rng.normal(0, 2, 2 * P)).astype(np.float32)
    return dict(mask=mask, tok_lp=tok_lp, summed=summed, ref=ref, lens=mask.sum(1))


def trl_dpo(pairs, loss_type, beta, label_smoothing=0.0, rows=slice(None)):
    """TRL 1.16's DPOTrainer._compute_loss on precomputed reference log-probs."""
    fn = trl_method("dpo_trainer", "DPOTrainer", "_compute_loss")
    idx = np.arange(2 * P).reshape(2, P)[:, rows].reshape(-1)  # [chosen rows; rejected rows]
    t = lambda x: torch.tensor(x[idx])  # noqa: E731
    ref = pairs["ref"][idx].reshape(2, -1)
    outputs = types.SimpleNamespace(
        log_probs=t(pairs["tok_lp"]),
        entropy=torch.zeros(len(idx), L - 1),
        mean_logits=torch.zeros(len(idx), L - 1),
        is_top1=torch.zeros(len(idx), L - 1, dtype=torch.bool),
    )
    self = types.SimpleNamespace(
        model=types.SimpleNamespace(training=True),
        accelerator=Accelerator(),
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=label_smoothing,
        use_weighting=False,
        _metrics=metrics_dict(),
        _total_train_tokens=0,
        _tp_size=1,
    )
    mask = t(pairs["mask"]).long()
    inputs = {
        "input_ids": torch.ones_like(mask),
        "attention_mask": torch.ones_like(mask),
        "completion_mask": mask,
        "ref_chosen_logps": torch.tensor(ref[0]),
        "ref_rejected_logps": torch.tensor(ref[1]),
    }
    return float(fn(self, lambda **kw: outputs, inputs, False))


def ours_dpo(logp, ref, loss, beta, label_smoothing=0.0):
    """Our dpo_loss on P pairs given as [2P] (chosen rows, then rejected rows)."""
    lp, lr = (jnp.asarray(x.reshape(2, -1).T) for x in (logp, ref))  # [P, 2] winner first
    ranks = jnp.tile(jnp.array([[0, 1]]), (lp.shape[0], 1))
    loss_, _ = dpo.dpo_loss(
        lp, lr, ranks, jnp.ones_like(lp), beta=beta, loss=loss, label_smoothing=label_smoothing
    )
    return float(loss_)


def test_dpo_sigmoid_equals_trl(pairs):
    for beta in (0.1, 0.5):
        close(
            ours_dpo(pairs["summed"], pairs["ref"], "sigmoid", beta),
            trl_dpo(pairs, "sigmoid", beta),
        )


def test_ipo_on_length_averaged_log_probs_equals_trl(pairs):
    """TRL's `ipo` divides each response's log-ratio by its length; ours sums (the paper), so
    ours on length-averaged log-probs is TRL's, and on summed ones it is not."""
    beta, n = 0.5, pairs["lens"]
    theirs = trl_dpo(pairs, "ipo", beta)
    close(ours_dpo(pairs["summed"] / n, pairs["ref"] / n, "ipo", beta), theirs)
    assert abs(ours_dpo(pairs["summed"], pairs["ref"], "ipo", beta) - theirs) > 0.1


def test_label_smoothing_is_conservative_dpo_not_trls_sigmoid_or_robust(pairs):
    beta, eps = 0.5, 0.1
    ours = ours_dpo(pairs["summed"], pairs["ref"], "sigmoid", beta, eps)
    # TRL 1.16's sigmoid ignores label_smoothing: it is our loss at eps = 0.
    close(
        trl_dpo(pairs, "sigmoid", beta, eps),
        ours_dpo(pairs["summed"], pairs["ref"], "sigmoid", beta),
    )
    # Conservative DPO is TRL's `aot` formula, which equals it on one pair (aot sorts the batch).
    for i in range(P):
        rows = np.array([i, P + i])
        one = ours_dpo(pairs["summed"][rows], pairs["ref"][rows], "sigmoid", beta, eps)
        close(one, trl_dpo(pairs, "aot", beta, eps, rows=slice(i, i + 1)))
    # TRL's robust: (-(1 - e) log s(z) + e log s(-z)) / (1 - 2e) = (cDPO + 2e log s(-z)) / (1 - 2e).
    d = (pairs["summed"] - pairs["ref"]).reshape(2, P)
    log_s_neg = np.mean(np.log(1 / (1 + np.exp(beta * (d[0] - d[1])))))
    close(trl_dpo(pairs, "robust", beta, eps), (ours + 2 * eps * log_s_neg) / (1 - 2 * eps))
    assert abs(trl_dpo(pairs, "robust", beta, eps) - ours) > 1e-3


# ---------------------------------------------------------------- GRPO advantages


def scores(seed=1):
    s = np.random.default_rng(seed).normal(0, 1, N * G).astype(np.float32)
    s[G : 2 * G] = 0.5  # an all-equal group (exact in float32: TRL's noise / 1e-4 is 0 too)
    return s


def trl_grpo_advantages(s, scale_rewards):
    """GRPOTrainer._generate_and_score_completions's advantage block, one reward function."""
    ns = trl_block(
        "grpo_trainer",
        "GRPOTrainer",
        "_generate_and_score_completions",
        "if self.multi_objective_aggregation == 'sum_then_normalize':",
        "advantages = torch.nan_to_num(advantages, nan=0.0)",
        self=types.SimpleNamespace(
            multi_objective_aggregation="sum_then_normalize",
            reward_weights=torch.ones(1),
            scale_rewards=scale_rewards,
            reward_funcs=[None],
        ),
        rewards_per_func=torch.tensor(s)[:, None],
        unscorable_mask=torch.zeros(len(s), dtype=torch.bool),
        num_generations=G,
        device="cpu",
    )
    return ns["advantages"].numpy()


def trl_rloo_advantages(s):
    """RLOOTrainer._generate_and_score_completions's advantage block (normalize_advantages off,
    TRL's default)."""
    ns = trl_block(
        "rloo_trainer",
        "RLOOTrainer",
        "_generate_and_score_completions",
        "grouped_rewards = rewards.view(-1, num_generations)",
        "advantages = torch.nan_to_num(advantages, nan=0.0)",
        self=types.SimpleNamespace(normalize_advantages=False),
        rewards=torch.tensor(s),
        num_generations=G,
    )
    return ns["advantages"].numpy()


@pytest.mark.parametrize(
    "scale_rewards,ours",
    [
        ("group", dict(kind="grpo")),  # GRPO
        ("none", dict(kind="grpo", scale_std=False)),  # Dr. GRPO
        ("batch", dict(kind="grpo", std_scope="batch")),  # TRL's batch scaling
    ],
)
def test_grpo_advantages_equal_trl_at_trls_epsilon(scale_rewards, ours):
    s = scores()
    theirs = trl_grpo_advantages(s, scale_rewards)
    close(grpo.group_advantages(jnp.asarray(s), G, eps=1e-4, **ours), theirs)
    assert np.all(theirs[G : 2 * G] == 0) and np.abs(theirs).max() > 0.5
    if scale_rewards == "group":
        # Our default eps is 1e-6: the same advantages scaled by (std + 1e-4) / (std + 1e-6).
        std = s.reshape(N, G).std(axis=1, ddof=1).repeat(G)
        default = np.asarray(grpo.group_advantages(jnp.asarray(s), G, **ours))
        close(default * (std + 1e-6) / (std + 1e-4), theirs)


def test_rloo_advantages_equal_trl():
    s = scores(2)
    close(grpo.group_advantages(jnp.asarray(s), G, kind="rloo"), trl_rloo_advantages(s))


# ---------------------------------------------------------------- GRPO per-token losses


@pytest.fixture(scope="module")
def rollout():
    rng = np.random.default_rng(3)
    mask = (np.arange(T)[None] < np.asarray(LENGTHS)[:, None]).astype(np.float32)  # [B, T]
    old = rng.normal(-2, 1, mask.shape).astype(np.float32)
    logp = old + rng.normal(0, 0.3, mask.shape).astype(np.float32)  # ratios on both sides
    logp[1, 1] = old[1, 1] + np.log(1.24)  # between 1 + 0.2 and 1 + 0.28
    ref = old + rng.normal(0, 0.5, mask.shape).astype(np.float32)
    adv = rng.normal(0, 1, N * G).astype(np.float32)
    adv[1] = abs(adv[1])
    return dict(mask=mask, logp=logp, old=old, ref=ref, adv=adv)


def trl_grpo_loss(r, loss_type, beta, eps_high, bias_correction=False, logp=None):
    """TRL 1.16's GRPOTrainer._compute_loss; -> (loss, d loss / d logp [B, T], metrics)."""
    fn = trl_method("grpo_trainer", "GRPOTrainer", "_compute_loss")
    lp = torch.tensor(r["logp"] if logp is None else logp, requires_grad=True)
    mask = torch.tensor(r["mask"]).long()
    self = types.SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **kw: (lp, torch.zeros_like(lp), None),
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level="token",
        beta=beta,
        args=types.SimpleNamespace(
            use_bias_correction_kl=bias_correction, delta=None, steps_per_generation=1
        ),
        loss_type=loss_type,
        epsilon_low=0.2,
        epsilon_high=eps_high,
        use_vllm=False,
        model=types.SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1,
        max_completion_length=T,
        accelerator=Accelerator(),
        _entropy_bonus_enabled=False,
        aux_loss_enabled=False,
        _metrics=metrics_dict(),
    )
    inputs = {
        "prompt_ids": torch.ones(N * G, 2, dtype=torch.long),
        "prompt_mask": torch.ones(N * G, 2, dtype=torch.long),
        "completion_ids": torch.ones(N * G, T, dtype=torch.long),
        "completion_mask": mask,
        "advantages": torch.tensor(r["adv"]),
        "old_per_token_logps": torch.tensor(r["old"]),
        "ref_per_token_logps": torch.tensor(r["ref"]),
        "num_items_in_batch": mask.sum(),  # dapo: the generation batch's tokens
    }
    loss = fn(self, None, inputs)
    loss.backward()
    m = {k: v[-1] for k, v in self._metrics["train"].items()}
    return float(loss.detach()), lp.grad.numpy(), m


def ours_grpo_loss(r, norm, beta, clip_high, logp=None):
    def f(lp):
        return grpo.policy_loss(
            lp, jnp.asarray(r["old"]), jnp.asarray(r["ref"]), jnp.asarray(r["adv"]),
            jnp.asarray(r["mask"]), clip=0.2, kl_coef=beta, norm=norm, clip_high=clip_high,
        )  # fmt: skip

    lp = jnp.asarray(r["logp"] if logp is None else logp)
    (loss, m), g = jax.value_and_grad(f, has_aux=True)(lp)
    return float(loss), np.asarray(g), m


@pytest.mark.parametrize(
    "norm,loss_type",
    [("sequence", "grpo"), ("token", "bnpo"), ("token", "dapo"), ("constant", "dr_grpo")],
)
@pytest.mark.parametrize("beta,clip_high", [(0.0, None), (0.04, 0.28)])
def test_grpo_losses_equal_trl(rollout, norm, loss_type, beta, clip_high):
    """Loss, gradient, clip fraction (counted where the clip binds, as TRL's region_mean) and
    the mean k3, with TRL's use_bias_correction_kl off."""
    eps_high = 0.2 if clip_high is None else clip_high
    loss, grad, m = ours_grpo_loss(rollout, norm, beta, clip_high)
    t_loss, t_grad, tm = trl_grpo_loss(rollout, loss_type, beta, eps_high)
    close(loss, t_loss)
    close(grad, t_grad)
    close(float(m["clipfrac"]), tm["clip_ratio/region_mean"])
    assert 0 < tm["clip_ratio/region_mean"] < 1
    if beta:
        close(float(m["kl"]), tm["kl"])


def test_trls_bias_corrected_kl_equals_ours_on_policy(rollout):
    """TRL's default use_bias_correction_kl multiplies k3 by the ratio: the same value at the
    first minibatch (ratio 1) but not the same gradient (d(rho k3) = d k3 + k3 at rho = 1, the
    reverse-KL gradient TRL estimates), and a different value off-policy."""
    on, beta, mask = rollout["old"], 0.5, rollout["mask"]
    loss, grad, _ = ours_grpo_loss(rollout, "token", beta, None, logp=on)
    t_loss, t_grad, _ = trl_grpo_loss(rollout, "dapo", beta, 0.2, bias_correction=True, logp=on)
    close(loss, t_loss)
    d = rollout["ref"] - on
    k3 = np.exp(d) - d - 1  # [B, T]
    n = mask.sum()  # the token norm's weight is 1 / n: compare at unit scale
    close((t_grad - grad) * n, np.where(mask > 0, beta * k3, 0.0))
    assert (beta * k3[mask > 0]).max() > 0.1
    off = ours_grpo_loss(rollout, "token", beta, None)[0]
    assert abs(off - trl_grpo_loss(rollout, "dapo", beta, 0.2, bias_correction=True)[0]) > 1e-4
