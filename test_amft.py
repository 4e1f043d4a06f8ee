"""
Tests of the algorithm (amft.py), offline on a CPU: losses, methods, the mu controller and
the meta-gradient. The policy is tested in test_model.py, the training loop in test_train.py,
the command line in test_cli.py, the verifiers and tasks in test_tasks.py, several processes
in test_parallel.py, with fixtures in conftest.py (the README gives the command).

A tiny Qwen2 is built from a config and saved once per session; losses and meta-gradients
run on it for real.
"""
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

import amft
import model as policy
import sampling


# ------------------------------------------------------------ GRPO and the baselines' losses
def test_zero_std_groups_get_zero_advantage():
    r = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    A, frac = amft.group_advantages(r)
    assert A[0].abs().sum() == 0 and A[2].abs().sum() == 0 and frac == pytest.approx(2 / 3)
    assert A[1, 1] > 0 > A[1, 0] and A[1].sum().abs() < 1e-6


def test_demonstration_joins_its_group_as_sample_g_plus_1():
    # srft / luffy: group [0, 0, 1] + demonstration 1 -> mean 0.5, std over all G+1 = 4 samples
    r, r_demo = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 0.0]]), torch.tensor([1.0, 0.0])
    A, A_demo, frac = amft.advantages(r, r_demo)
    std = torch.tensor([0.0, 0.0, 1.0, 1.0]).std().item()
    assert A.shape == (6,) and A_demo.shape == (2,) and frac == 0.5
    assert (A_demo[0].item() == pytest.approx(0.5 / (std + 1e-4))
            and A[0].item() == pytest.approx(-0.5 / (std + 1e-4)))
    assert A_demo[1] == 0 and A[3:].abs().sum() == 0  # all four equal: no signal
    # all rollouts wrong, the demonstration right: the group has a signal only with the
    # demonstration
    A, A_demo, frac = amft.advantages(torch.zeros(1, 3), torch.tensor([1.0]))
    assert frac == 0.0 and A_demo[0] > 0 > A[0] and amft.advantages(torch.zeros(1, 3))[2] == 1.0


def test_grpo_gradient_raises_positive_and_lowers_negative(tiny64):
    model, tok = tiny64
    prompt = tok(["make 3: "] * 2, return_tensors="pt", add_special_tokens=False)
    comp = torch.tensor([tok("1+2", add_special_tokens=False).input_ids + [tok.eos_token_id],
                         tok("2*1", add_special_tokens=False).input_ids + [tok.eos_token_id]])
    cmask = torch.ones_like(comp, dtype=torch.float64)
    full = torch.cat([prompt.input_ids, comp], 1)
    attn, C = torch.ones_like(full), comp.shape[1]
    seq_logp = lambda: policy.token_logprobs(model, full, attn, n_last=C).sum(1)
    before = seq_logp().detach()
    logp = policy.token_logprobs(model, full, attn, n_last=C)
    loss, _ = amft.grpo_loss(logp, logp.detach(), torch.tensor([1.0, -1.0], dtype=torch.float64),
                             cmask)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    with torch.no_grad():
        for p, g in zip(model.parameters(), grads):
            p -= 1e-2 * g
        after = seq_logp()
        for p, g in zip(model.parameters(), grads):  # undo: the fixture is shared
            p += 1e-2 * g
    assert after[0] > before[0] and after[1] < before[1]


def test_grpo_clip_both_signs():
    # token 0: ratio e > 1 + eps_high; token 1: ratio 0.5 < 1 - eps_low
    logp = torch.tensor([[0.0, math.log(0.5)]], requires_grad=True)
    old = torch.tensor([[-1.0, 0.0]])
    # A > 0: the high ratio is clipped (no gradient), the low one is not
    loss, m = amft.grpo_loss(logp, old, torch.tensor([1.0]), torch.ones(1, 2))
    (g,) = torch.autograd.grad(loss, logp)
    assert loss.item() == pytest.approx(-(1.28 + 0.5) / 2) and m["clip_frac"] == 0.5
    assert g[0, 0] == 0 and g[0, 1].item() == pytest.approx(-0.5 / 2)
    # A < 0: the low ratio is clipped at 1 - eps_low (no gradient), the high one is not
    loss, m = amft.grpo_loss(logp, old, torch.tensor([-1.0]), torch.ones(1, 2))
    (g,) = torch.autograd.grad(loss, logp)
    assert loss.item() == pytest.approx((math.e + 0.8) / 2) and m["clip_frac"] == 0.5
    assert g[0, 1] == 0 and g[0, 0].item() == pytest.approx(math.e / 2)


def test_clip_fraction_adds_up_over_micro_batches():
    torch.manual_seed(0)
    logp, old = torch.randn(6, 5) * 0.3, torch.randn(6, 5) * 0.3  # many ratios outside [0.8, 1.28]
    A, mask = torch.randn(6), (torch.rand(6, 5) > 0.3).float()
    _, whole = amft.grpo_loss(logp, old, A, mask)
    parts = [amft.grpo_loss(logp[s], old[s], A[s], mask[s], denom=mask.sum())[1]["clip_frac"]
             for s in (slice(0, 2), slice(2, 6))]
    assert 0.1 < whole["clip_frac"] < 0.9 and sum(parts) == pytest.approx(whole["clip_frac"])


def test_k3_kl_per_token_and_its_expectation():
    # per token: exp(ref - logp) - (ref - logp) - 1 (k1 = logp - ref would give 1.5 here)
    logp, ref = torch.tensor([[0.0, 0.0]]), torch.tensor([[-1.0, -2.0]])
    _, m = amft.grpo_loss(logp, logp, torch.tensor([0.0]), torch.ones(1, 2), beta=0.1, ref_logp=ref)
    assert m["kl"] == pytest.approx(((math.exp(-1) + 1 - 1) + (math.exp(-2) + 2 - 1)) / 2)
    # weighting each token of a categorical pi by pi(y), the mean is exactly KL(pi || ref)
    pi, q = (torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64),
             torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64))
    _, m = amft.grpo_loss(pi.log()[None], pi.log()[None], torch.zeros(1, dtype=torch.float64),
                          pi[None], beta=1.0, ref_logp=q.log()[None])
    assert m["kl"] == pytest.approx((pi * (pi / q).log()).sum().item(), rel=1e-12)


def test_off_policy_losses():
    logp = torch.log(torch.tensor([[0.5, 0.01]], requires_grad=True))
    logp.retain_grad()
    amft.off_policy_loss(logp, torch.tensor([1.0]), torch.ones(1, 2), shaping=True).backward()
    p = torch.tensor([0.5, 0.01])
    # d/dlogp of -mean(f(p)) = -(gamma p / (p + gamma)^2) / 2: rare tokens keep a large weight
    # relative to p
    torch.testing.assert_close(logp.grad[0], -(0.1 * p / (p + 0.1) ** 2) / 2)
    logp2 = torch.zeros(1, 2, requires_grad=True)
    amft.off_policy_loss(logp2, torch.tensor([2.0]), torch.ones(1, 2), shaping=False).backward()
    torch.testing.assert_close(logp2.grad, torch.full((1, 2), -1.0))


# ------------------------------------------------------------ methods as data
def test_methods_are_presets_of_switches():
    M = amft.METHODS
    assert M["amft-no-meta"] == amft.Method(warmup=True, entropy_term=True)
    assert M["amft-no-entropy"] == amft.Method(warmup=True, meta_term=True)
    expect = {"sft": (0.0, 1.0), "grpo": (1.0, 0.0), "sft-grpo": (1.0, 0.0), "luffy": (1.0, 0.0),
              "fixed-mix": (0.3, 0.7), "amft": (0.3, 0.7), "srft": (1.0, 0.5 * math.exp(-0.4))}
    for name, w in expect.items():
        assert amft.loss_weights(M[name], mu=0.7, H=0.4) == pytest.approx(w), name
        assert amft.loss_weights(M[name], mu=0.7, H=0.4, warm=True) == (0.0, 1.0)
    assert amft.phase(M["sft-grpo"], 3, warmup=5) == amft.Phase(warm=True, rl=False, sft=True,
                                                                demos=True)
    assert amft.phase(M["sft-grpo"], 5, warmup=5) == amft.Phase(warm=False, rl=True, sft=False,
                                                                demos=False)
    assert amft.phase(M["luffy"], 0, warmup=5) == amft.Phase(warm=False, rl=True, sft=False,
                                                             demos=True)
    assert amft.phase(M["sft"], 9, warmup=5) == amft.Phase(warm=False, rl=False, sft=True,
                                                           demos=True)


def test_mix_grads_in_place():
    g_rl, g_sft = {"a": torch.tensor(2.0)}, {"a": torch.tensor(4.0), "b": torch.tensor(1.0)}
    a = g_rl["a"]
    g = amft.mix_grads_(g_rl, g_sft, 0.75, 0.25)
    assert (g["a"].item() == pytest.approx(2.5) and g["b"].item() == pytest.approx(0.25)
            and g["a"] is a)


# ------------------------------------------------------------ the mu controller
def _controller(**kw):
    method = amft.Method(warmup=True, entropy_term=kw.pop("entropy_term", True),
                         meta_term=kw.pop("meta_term", True))
    return amft.MuController(method, **{**dict(mu0=0.5, mu_min=0.05, mu_max=0.95, eta_meta=0.1,
                                               eta_H=0.1, meta_every=2), **kw})


def test_entropy_term_sign_and_bounds():
    c = _controller(meta_term=False)
    c.update(H=1.0)                       # the first main step sets the target
    assert c.H_target == 1.0 and c.mu == 0.5
    c.update(H=0.4)                       # collapse below target: more imitation
    assert c.mu == pytest.approx(0.5 + 0.1 * 0.6)
    c.update(H=2.0)
    assert c.mu == pytest.approx(0.56 - 0.1)
    assert amft.update_mu(0.9, 0.0, 0.6, 0.0, 10.0, 0.05, 0.95) == 0.95
    assert amft.update_mu(0.1, 0.0, -0.6, 0.0, 10.0, 0.05, 0.95) == 0.05


def test_the_entropy_target_can_follow_the_entropy_instead():
    # the alternative to the spec's once-measured H*: an EMA of the entropy (--H-target-ema); each
    # step's entropy signal uses the target from before the step, then the target moves part of
    # the way to H
    c = _controller(meta_term=False, H_target_ema=0.25)
    c.update(H=1.0)
    assert c.H_target == 1.0 and c.mu == 0.5
    c.update(H=0.2)
    assert c.mu == pytest.approx(0.5 + 0.1 * 0.8) and c.H_target == pytest.approx(1.0 - 0.25 * 0.8)
    c.update(H=0.2)  # a lasting drop pushes less and less: the target comes down to meet it
    assert c.mu == pytest.approx(0.58 + 0.1 * 0.6) and c.H_target == pytest.approx(0.8 - 0.25 * 0.6)
    spec = _controller(meta_term=False)
    for H in (1.0, 0.2, 0.2):
        spec.update(H=H)
    assert spec.H_target == 1.0  # the spec's: measured once


def test_normalized_meta_grad_is_in_units_of_mu():
    v, n, out = 0.0, 0, []
    for g in (1e-9, -2e-9, 1.5e-9):
        s, v, n = amft.normalize_meta_grad(g, v, n)
        out.append(s)
    assert out[0] == pytest.approx(1.0) and out[1] < -1.0 and 0.3 < out[2] < 2


def test_silent_meta_gradients_neither_move_mu_nor_enter_the_rms():
    # a dU/dmu over validation groups whose rewards were all equal is exactly 0 and says nothing:
    # ten of them in a row used to shrink the RMS and scale the next real value to 2.6
    quiet, loud = _controller(entropy_term=False), _controller(entropy_term=False)
    for c in (quiet, loud):
        c.update(H=0.5, dU_dmu=2e-6)
    for _ in range(10):
        m = quiet.update(H=0.5, dU_dmu=0.0, silent=True)
        assert m["meta_grad"] is None and m["meta_grad_scaled"] is None and m["mu"] == loud.mu
    assert quiet.silent == 10 and m["meta_silent"] == 10 and quiet.state_dict()["silent"] == 10
    assert (quiet.mu, quiet.meta_v, quiet.meta_n) == (loud.mu, loud.meta_v, loud.meta_n)
    after_quiet, after_loud = quiet.update(H=0.5, dU_dmu=-1e-6), loud.update(H=0.5, dU_dmu=-1e-6)
    assert after_quiet["meta_grad_scaled"] == after_loud["meta_grad_scaled"] and quiet.mu == loud.mu
    # what the count keeps from happening: the zeros entering the RMS inflate the next value
    inflated = _controller(entropy_term=False)
    inflated.update(H=0.5, dU_dmu=2e-6)
    for _ in range(10):
        inflated.update(H=0.5, dU_dmu=0.0)
    assert (abs(inflated.update(H=0.5, dU_dmu=-1e-6)["meta_grad_scaled"])
            > 2 * abs(after_loud["meta_grad_scaled"]))


@pytest.mark.parametrize("bad", ["entropy", "meta", "loss"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_input_leaves_the_controller_unchanged(bad, value):
    c = _controller(H_target=None)
    c.update(H=1.0, dU_dmu=1e-6)
    c.update(H=0.5, dU_dmu=-3e-6)
    before = c.state_dict()
    assert 0.05 < before["mu"] < 0.95 and before["meta_v"] > 0 and before["meta_n"] == 2
    kw = {"entropy": dict(H=value, dU_dmu=1e-6), "meta": dict(H=0.5, dU_dmu=value),
          "loss": dict(H=0.5, dU_dmu=1e-6, losses_finite=False)}[bad]
    m = c.update(**kw)
    after = c.state_dict()
    assert ({k: v for k, v in after.items() if k != "rejected"}
            == {k: v for k, v in before.items() if k != "rejected"})
    assert after["rejected"] == 1 and m["mu_rejected"] == 1 and m["mu"] == before["mu"]
    c.update(H=0.5, dU_dmu=1e-6)          # and it goes on
    assert math.isfinite(c.mu) and c.mu != before["mu"] and c.meta_n == 3
    # a huge but finite dU/dmu whose square overflows the RMS is refused too
    assert c.update(H=0.5, dU_dmu=1e200)["mu_rejected"] == 2 and math.isfinite(c.meta_v)
    # a NaN entropy on the very first main step does not become the target
    first = _controller()
    first.update(H=float("nan"))
    assert first.H_target is None and first.update(H=0.7)["H_target"] == 0.7


# ------------------------------------------------------------ meta-gradient
def _meta_setup(model, tok, seed=0, n_val=6, G=3):
    """Real g_SFT and g_RL on the tiny model, and a micro-batchable U_sur on fixed rollouts."""
    torch.manual_seed(seed)
    params = {n: p for n, p in model.named_parameters()}
    demo = policy.sft_batch(tok, ["make 3: ", "make 2: "], ["1+2", "1*2"], tok.eos_token_id, "cpu")
    logp_demo = policy.token_logprobs(model, demo.ids, demo.attn, n_last=demo.mask.shape[1])
    g_sft = dict(zip(params, torch.autograd.grad(amft.sft_loss(logp_demo, demo.mask),
                                                 list(params.values()))))
    roll = sampling.sample(model, tok, ["make 3: ", "make 2: "], G=G, max_new_tokens=5)
    C, N = roll.mask.shape[1], len(roll.texts)
    gen = torch.Generator().manual_seed(seed)
    A_rl, A_val = (torch.randn(N, generator=gen, dtype=torch.float64),
                   torch.randn(N, generator=gen, dtype=torch.float64))
    logp = policy.token_logprobs(model, roll.ids, roll.attn, n_last=C)
    dtype = logp.dtype
    rl_loss = amft.grpo_loss(logp, logp.detach(), A_rl.to(dtype), roll.mask.to(dtype))[0]
    g_rl = dict(zip(params, torch.autograd.grad(rl_loss, list(params.values()))))

    # token_logprobs as a module, to evaluate at other weights (functional_call)
    class Scored(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, ids, attn):
            return policy.token_logprobs(self.model, ids, attn, n_last=C)

    def U(chunk, at=None):  # at: other weights than the model's (a dict of name -> tensor)
        args = (roll.ids[chunk], roll.attn[chunk])
        lp = Scored()(*args) if at is None else torch.func.functional_call(
            Scored(), {f"model.{k}": v for k, v in at.items()}, args)
        return amft.policy_gradient_surrogate(lp, A_val[chunk].to(lp), roll.mask[chunk].to(lp), n=N)
    return params, g_sft, g_rl, U, [slice(0, N)]


@pytest.mark.parametrize("seed", range(8))
def test_meta_gradient_autograd_matches_finite_difference_float64(tiny64, seed):
    model, tok = tiny64
    params, g_sft, g_rl, U, one = _meta_setup(model, tok, seed)
    for alpha in (1.0, 1e-3, 1e-6):
        exact = amft.meta_grad_autograd(U, params, g_rl, g_sft, 0.6, alpha, one)
        fd = amft.meta_grad_fd(U, params, g_rl, g_sft, 0.6, alpha, one)
        assert exact != 0 and abs(exact - fd) <= 1e-6 * abs(exact), (seed, alpha, exact, fd)


def test_autograd_estimator_equals_backprop_into_a_leaf_mu(tiny64):
    # the estimator chains grad U(theta') through dtheta'/dmu by hand (no parameter-sized
    # temporaries); backpropagating into mu itself, through the look-ahead, gives the same number
    model, tok = tiny64
    params, g_sft, g_rl, U, one = _meta_setup(model, tok, seed=3)
    mu = torch.tensor(0.6, dtype=torch.float64, requires_grad=True)
    theta = amft.lookahead({k: p.detach() for k, p in params.items()}, g_rl, g_sft, mu, 1e-2)
    (leaf,) = torch.autograd.grad(U(one[0], at=theta), mu)
    before = {k: p.detach().clone() for k, p in params.items()}
    assert leaf != 0 and (amft.meta_grad_autograd(U, params, g_rl, g_sft, 0.6, 1e-2, one)
                          == pytest.approx(leaf.item(), rel=1e-9))
    assert all(p.grad is None for p in params.values())  # and the model's .grad is left alone
    # the weights were moved to theta' in place and back: within one rounding of where they were
    for k, p in params.items():  # two roundings, each at most half an ulp of theta or theta'
        bound = 2 ** -52 * (before[k].abs() + amft.lookahead_step(k, g_rl, g_sft, 0.6, 1e-2).abs())
        assert ((p - before[k]).abs() <= bound).all(), k
    assert any((p != before[k]).any() for k, p in params.items())  # (so the bound was tested)


def test_the_look_ahead_in_place_holds_no_copy_of_the_weights_and_agrees_with_grad_checkpointing(
        tiny_path):
    # theta' lives in the model's own tensors, so gradient checkpointing (which re-runs each
    # layer's forward during backward) recomputes at theta' too: the estimate is the same with it
    # on
    model, tok = policy.load_policy(tiny_path, dtype=torch.float64)
    params, g_sft, g_rl, U, one = _meta_setup(model, tok, seed=4)
    plain = amft.meta_grad_autograd(U, params, g_rl, g_sft, 0.6, 1e-2, one)
    policy.set_checkpointing(model, True)
    model.train()
    assert plain != 0 and (amft.meta_grad_autograd(U, params, g_rl, g_sft, 0.6, 1e-2, one)
                           == pytest.approx(plain, rel=1e-9))


def test_finite_difference_is_right_in_float32_at_a_real_learning_rate(tiny_path):
    # alpha = 1e-6: the probe is far below float32's round-off of the weights at h = 1e-3
    model, tok = policy.load_policy(tiny_path, dtype=torch.float32)
    params, g_sft, g_rl, U, one = _meta_setup(model, tok, seed=1)
    exact = amft.meta_grad_autograd(U, params, g_rl, g_sft, 0.6, 1e-6, one)
    fd = amft.meta_grad_fd(U, params, g_rl, g_sft, 0.6, 1e-6, one)
    assert exact != 0 and fd * exact > 0 and abs(fd - exact) <= 0.05 * abs(exact), (exact, fd)
    naive = amft.meta_grad_fd(U, params, g_rl, g_sft, 0.6, 1e-6, one, h=1e-3)
    assert abs(naive - exact) > 0.05 * abs(exact)  # the fixed step the dtype-sized one replaces


def test_meta_gradient_in_micro_batches_equals_one_pass(tiny64):
    model, tok = tiny64
    params, g_sft, g_rl, U, one = _meta_setup(model, tok, seed=2, G=4)
    chunks = [slice(0, 3), slice(3, 6), slice(6, 8)]
    for name, estimator in amft.META_GRADS.items():
        whole = estimator(U, params, g_rl, g_sft, 0.6, 1e-3, one)
        rel = 1e-6 if name == "fd" else 1e-9  # fd's own round-off is ~1e-8 relative in float64
        assert whole != 0 and (estimator(U, params, g_rl, g_sft, 0.6, 1e-3, chunks)
                               == pytest.approx(whole, rel=rel)), name


def test_first_order_approaches_exact_as_alpha_shrinks(tiny64):
    model, tok = tiny64
    params, g_sft, g_rl, U, one = _meta_setup(model, tok)
    errors = []
    for alpha in (3.0, 0.3, 0.03, 0.003):
        exact = amft.meta_grad_autograd(U, params, g_rl, g_sft, 0.6, alpha, one)
        first = amft.meta_grad_first_order(U, params, g_rl, g_sft, 0.6, alpha, one)
        errors.append(abs(first - exact) / abs(exact))
    assert errors == sorted(errors, reverse=True) and errors[-1] < 1e-2 < errors[0], errors


@pytest.mark.parametrize("sft_helps", [True, False])
def test_meta_step_moves_mu_toward_the_helpful_loss(sft_helps):
    # U(w) = <c, w>. A descent step on L_SFT moves w by -alpha g_SFT; with g_SFT = -c it
    # raises U (SFT helps), while g_RL = +c lowers it: mu must go up. Swapped: mu goes down.
    c = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    params = {"w": torch.zeros(3, dtype=torch.float64, requires_grad=True)}
    g_sft, g_rl = ({"w": -c}, {"w": c}) if sft_helps else ({"w": c}, {"w": -c})
    U = lambda chunk: (c * params["w"]).sum()
    estimates = [f(U, params, g_rl, g_sft, 0.5, 0.1, [slice(None)])
                 for f in amft.META_GRADS.values()]
    for g in estimates:
        assert g == pytest.approx(estimates[0]) and (g > 0) == sft_helps
        controller = _controller(entropy_term=False)
        controller.update(H=1.0, dU_dmu=g)
        assert (controller.mu > 0.5) == sft_helps and controller.mu != 0.5
