"""
Adaptive Meta Fine-Tuning (AMFT), as pure functions and one small controller: tensors in,
tensors (or numbers) out. No model loading, no tokenizer, no I/O.

Paper: He, Feng, Li, "AMFT: Aligning LLM Reasoners by Meta-Learning the Optimal
Imitation-Exploration Balance", arXiv 2508.06944 (withdrawn by its authors, Oct 2025; their
public code is a skeleton that does not run). This file says in full what we implement.

Notation: pi_theta the policy; x a prompt, y* its demonstration; G completions y_1..y_G sampled
per prompt at temperature tau; r_i in [0, 1] their verifiable rewards; mu in [mu_min, mu_max] the
weight on imitation (SFT), 1 - mu the weight on exploration (RL).

One loss mixes the two with a learned weight mu:
    L(theta; mu) = (1 - mu) * L_RL(theta) + mu * L_SFT(theta)
    L_SFT = - mean over all demonstration tokens of the batch of log pi(y*_t | x, y*_<t)
    L_RL  = - sum_i,t min(rho A_i, clip(rho, 1-eps_low, 1+eps_high) A_i) / sum_i |y_i|
            (+ beta * KL_k3(pi || pi_ref)),   rho = pi / pi_old,
            A_i = (r_i - mean r) / (std r + eps), and A = 0 for a group whose rewards are equal.
Log-probs use the sampling temperature; completion masks come from lengths and the first EOS.

The mu controller (`MuController`). After an SFT-only warm-up of W steps, every step t:
    g_H    = H_target - H_t          H_t: mean token entropy of this step's rollouts; H_target:
                                     the same measured on the first step after warm-up.
                                     Entropy below target (collapse) => mu goes up (imitate more).
    g_meta = dU/dmu                  every K steps, through a one-step look-ahead
             theta'(mu) = theta - alpha [(1 - mu) g_RL + mu g_SFT],   g_X = grad L_X(theta)
             dU/dmu = <grad U(theta'), dtheta'/dmu> = -alpha <grad U(theta'), g_SFT - g_RL>
    mu <- clip(mu + eta_meta * g_meta / RMS(g_meta) + eta_H * g_H, mu_min, mu_max)
    theta <- AdamW step on (1 - mu) g_RL + mu g_SFT          (the same two gradients, new mu)
U is the expected verifiable reward on held-out validation prompts (to maximise), estimated by
the policy-gradient surrogate U_sur(phi) = mean_i A_i * mean_t log pi_phi(y_i,t) on validation
rollouts sampled from pi_theta. dU/dmu has three estimators on the same U_sur:
    first-order (the paper's): grad U taken at theta instead of theta'
    autograd: grad U_sur(theta'(mu)) by autograd, chained exactly through dtheta'/dmu
              (exact for U_sur)
    fd: central difference [U(theta'(mu + h)) - U(theta'(mu - h))] / 2h, h sized by dtype
The controller checks its inputs before it changes anything: a non-finite entropy, loss or
dU/dmu leaves mu, H_target and the RMS exactly as they were (the step is counted as rejected).

Where this departs from the paper (and the authors' code), and why:
1. Sign of the meta step. The authors' code adds the gradient of a validation *loss* to mu
   (gradient ascent on the loss). We ascend the validation *utility* U: dU/dmu > 0 moves mu up.
2. Scale of the meta step. The raw dU/dmu is proportional to alpha and tiny; we divide it by
   its running RMS (bias-corrected, like Adam's second moment), so eta_meta is in units of mu.
   A silent dU/dmu, over validation groups whose rewards are all equal (A = 0 everywhere, so
   exactly 0), is counted (`meta_silent`) and skipped: it neither moves mu nor enters the RMS,
   which zeros would shrink until the next real value is scaled up several times over.
3. The look-ahead is one plain gradient step of size alpha (default: the learning rate), even
   though the real update is AdamW.
4. One policy update per batch of rollouts, so pi_old = pi_theta (detached) and rho = 1 at the
   update; the clip is kept so the loss is GRPO's, and binds when updates per batch > 1.
5. H_target is measured once, on the policy's own rollouts on the first step after the SFT
   warm-up, unless given as a flag.
6. Robustness the paper does not discuss: non-finite inputs never reach the controller's state
   (above); fd sizes its step h by the dtype's round-off, not a fixed 1e-3 (`fd_step`), and is
   refused in bfloat16, where no step makes it agree with autograd (the trainer says so).
7. How autograd is computed. Building theta'(mu) with a leaf mu and backpropagating into mu
   gives the same number (a test checks it to 1e-9) but holds theta' and several
   parameter-sized temporaries; we move the weights to theta' in place (`moved_to_lookahead`),
   take grad U there and dot it with g_SFT - g_RL tensor by tensor as autograd produces it.
   The price: the weights return from theta' within one rounding (1 ulp), not bit for bit.

The baselines are presets of the same switches (`Method`, `METHODS`); the loop reads switches,
never names. Their update is w_RL g_RL + w_SFT g_SFT (`loss_weights`):
  sft (0, 1); grpo, luffy, sft-grpo after its SFT stage (1, 0); fixed-mix and amft (1 - mu, mu);
  srft (1, 0.5 exp(-H)).  Choices of ours where the baselines' papers leave room:
8. SRFT (arXiv 2506.19767): H in w_SFT = 0.5 sg(exp(-H)) is the mean token entropy of this step's
   rollouts; "RL on demonstrations" puts the demonstration in the GRPO group as its (G+1)-th
   sample with the plain policy gradient (no ratio: it was not sampled from pi). SRFT's extra
   weighting of positive self-rollouts is not implemented.
9. LUFFY (arXiv 2504.14945): the demonstration is the group's (G+1)-th sample, advantages are
   computed over all G+1, and its tokens use the shaped objective f(p) = p / (p + 0.1), unclipped.
10. Warm-up: amft, its ablations, fixed-mix and sft-grpo (whose first stage it is) start with
   W SFT-only steps; sft, grpo, srft and luffy start from the base model, as in their papers.
11. The warm-up's budget and learning rate. The authors run their W warm-up steps before their
   main steps, at the main lr (1e-6 in their config). Here --steps counts the warm-up, which has
   a learning rate of its own (--warmup-lr), and the recipe for pretrained models follows
   published small-model runs (SFT 2e-5 or 1e-5, then 5e-6 with 16 prompts x 8 samples on GSM8K),
   not the authors' config: no published run of a model of 1.5B or less learns at 1e-6 with 8
   prompts per step (docs/real-models.md gives each value's source).
"""
import contextlib
import dataclasses
import math

import torch


# ---------------------------------------------------------------------------- methods as data
@dataclasses.dataclass(frozen=True)
class Method:
    rl: bool = True                     # sample G rollouts per prompt and add the GRPO gradient
    sft: bool = True                    # add the SFT gradient on demonstrations (after any warm-up)
    warmup: bool = False                # begin with W SFT-only steps
    entropy_term: bool = False          # the controller moves mu by eta_H (H_target - H)
    meta_term: bool = False             # the controller moves mu by the meta-gradient,
                                        # every K steps
    entropy_weighted_sft: bool = False  # SRFT: w_SFT = 0.5 sg(exp(-H)), w_RL = 1
    demo_in_group: bool = False         # the demonstration is each GRPO group's (G+1)-th sample
    shaped: bool = False                # LUFFY: f(p) = p / (p + 0.1) on the demonstration's tokens

    @property
    def mixes(self) -> bool:
        """The update is (1 - mu) g_RL + mu g_SFT."""
        return self.rl and self.sft and not self.entropy_weighted_sft


AMFT = Method(warmup=True, entropy_term=True, meta_term=True)
METHODS = {
    "amft": AMFT,
    "amft-no-meta": dataclasses.replace(AMFT, meta_term=False),
    "amft-no-entropy": dataclasses.replace(AMFT, entropy_term=False),
    "fixed-mix": dataclasses.replace(AMFT, entropy_term=False, meta_term=False),
    "sft": Method(rl=False),
    "grpo": Method(sft=False),
    "sft-grpo": Method(sft=False, warmup=True),  # two stages: the warm-up is its SFT stage
    "srft": Method(entropy_weighted_sft=True, demo_in_group=True),
    "luffy": Method(sft=False, demo_in_group=True, shaped=True),
}


@dataclasses.dataclass(frozen=True)
class Phase:
    warm: bool   # an SFT-only warm-up step
    rl: bool     # rollouts and g_RL this step
    sft: bool    # demonstrations and g_SFT this step
    demos: bool  # the step needs the demonstrations (for SFT or inside the GRPO groups)

    @property
    def name(self) -> str:
        return "warmup" if self.warm else "main"


def phase(method: Method, step: int, warmup: int) -> Phase:
    """What the loop computes at `step`."""
    warm = method.warmup and step < warmup
    rl, sft = method.rl and not warm, method.sft or warm
    return Phase(warm=warm, rl=rl, sft=sft, demos=sft or (rl and method.demo_in_group))


def loss_weights(method: Method, mu: float, H: float = 0.0, warm: bool = False):
    """(w_RL, w_SFT) of the update w_RL g_RL + w_SFT g_SFT."""
    if warm or not method.rl:
        return 0.0, 1.0
    if not method.sft:
        return 1.0, 0.0
    if method.entropy_weighted_sft:
        return 1.0, 0.5 * math.exp(-H)  # SRFT: w_SFT = 0.5 sg(exp(-H))
    return 1.0 - mu, mu


def mix_grads_(g_rl: dict, g_sft: dict, w_rl: float, w_sft: float) -> dict:
    """w_RL g_RL + w_SFT g_SFT per parameter, computed in place in g_rl's tensors (g_sft's where
    g_rl has none), so mixing allocates no gradient-sized buffer. A missing gradient counts as 0."""
    mixed = {}
    for k in list(g_rl) + [k for k in g_sft if k not in g_rl]:
        if k in g_rl:
            mixed[k] = g_rl[k].mul_(w_rl)
            if k in g_sft:
                mixed[k].add_(g_sft[k], alpha=w_sft)
        else:
            mixed[k] = g_sft[k].mul_(w_sft)
    return mixed


# ---------------------------------------------------------------------------- losses
def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None, denom=None) -> torch.Tensor:
    """Mean of x where mask is 1. `denom` replaces the mask's count: with micro-batches, each
    chunk divides by the whole batch's token count, so the chunks' losses add up exactly."""
    if dim is None:
        return (x * mask).sum() / (mask.sum().clamp(min=1) if denom is None else denom)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def sft_loss(logp: torch.Tensor, mask: torch.Tensor, denom=None) -> torch.Tensor:
    """Negative log-likelihood averaged over all demonstration tokens of the batch."""
    return -masked_mean(logp, mask, denom=denom)


def group_advantages(rewards: torch.Tensor, eps: float = 1e-4):
    """rewards (B, G) -> advantages (B, G), fraction of groups with zero std.
    A group whose rewards are all equal gets A = 0 exactly: it carries no signal."""
    std = rewards.std(dim=1, keepdim=True)                          # (B, 1)
    zero = std < 1e-8
    A = torch.where(zero, torch.zeros_like(rewards),
                    (rewards - rewards.mean(1, keepdim=True)) / (std + eps))
    return A, zero.float().mean().item()


def advantages(r: torch.Tensor, r_demo=None):
    """Rewards r (B, G) -> advantages of the rollouts (B*G,), of the demonstrations (B,) or
    None, and the fraction of zero-std groups. With r_demo (B,) (srft, luffy) each
    demonstration joins its group as the (G+1)-th sample: the group's mean and std are over G+1."""
    if r_demo is None:
        A, frac = group_advantages(r)
        return A.flatten(), None, frac
    A, frac = group_advantages(torch.cat([r, r_demo[:, None].to(r)], 1))   # (B, G+1)
    return A[:, :-1].flatten(), A[:, -1], frac


def grpo_loss(logp, old_logp, A, mask, eps_low=0.2, eps_high=0.28, beta=0.0, ref_logp=None,
              denom=None, n_tokens=None):
    """Clipped GRPO/DAPO loss, token-level mean. logp, old_logp, ref_logp, mask: (N, T);
    A: (N,) one advantage per completion. `denom` divides the surrogate: the whole batch's
    token count (srft/luffy add their demonstrations' tokens to it); `n_tokens` divides the
    KL and the clip fraction: the whole batch's rollout tokens (default: denom). With
    micro-batches every returned value then adds up over chunks. Returns loss, metrics."""
    ratio = torch.exp(logp - old_logp)                               # (N, T)
    A = A[:, None]                                                   # (N, 1)
    surrogate = torch.min(ratio * A, ratio.clamp(1 - eps_low, 1 + eps_high) * A)
    loss = -masked_mean(surrogate, mask, denom=denom)
    n_tokens = denom if n_tokens is None else n_tokens
    metrics = {"clip_frac": masked_mean((surrogate < ratio * A).float(), mask,
                                        denom=n_tokens).item()}
    if beta > 0:
        # k3 estimator of KL(pi || ref), Schulman 2020: exp(ref - logp) - (ref - logp) - 1
        d = ref_logp - logp
        kl = masked_mean(torch.exp(d) - d - 1, mask, denom=n_tokens)
        loss = loss + beta * kl
        metrics["kl"] = kl.item()
    return loss, metrics


def off_policy_loss(logp, A, mask, shaping: bool, gamma=0.1, denom=None):
    """RL on demonstrations (not sampled from pi, so no ratio to clip). LUFFY (arXiv 2504.14945)
    shapes the token probability, f(p) = p / (p + gamma), which keeps the gradient of rare
    demonstration tokens large: grad f = gamma / (p + gamma)^2 * grad p. SRFT (arXiv 2506.19767)
    uses the plain policy gradient A * grad log p. logp, mask: (N, T); A: (N,)."""
    objective = logp.exp() / (logp.exp() + gamma) if shaping else logp
    return -masked_mean(A[:, None] * objective, mask, denom=denom)


def policy_gradient_surrogate(logp, A, mask, n=None):
    """U_sur = mean_i A_i * mean_t log pi(y_i,t): its gradient estimates grad E[reward].
    `n` replaces the number of rows (a micro-batch divides by the whole batch's)."""
    per_row = A * masked_mean(logp, mask, dim=1)                     # (N,)
    return per_row.sum() / (len(per_row) if n is None else n)


def accumulate(loss_of, chunks, backward=True) -> dict:
    """The one micro-batch loop: for each chunk, loss_of(chunk) -> (loss, metrics), and
    loss.backward() accumulates its gradient. Each chunk divides by the whole batch's
    denominator, so the sums returned ({"loss": ..., **metrics}) are the whole batch's values.
    backward=False only sums (finite differences)."""
    total = {}
    for chunk in chunks:
        loss, metrics = loss_of(chunk)
        if backward:
            loss.backward()
        for k, v in {"loss": loss, **metrics}.items():
            total[k] = total.get(k, 0.0) + (v.item() if torch.is_tensor(v) else v)
    return total


# ---------------------------------------------------------------------------- mu controller
def entropy_signal(H_target: float, H: float) -> float:
    """g_H = H_target - H: positive when entropy collapses below target, pushing mu up."""
    return H_target - H


def normalize_meta_grad(g: float, v: float, n: int, beta: float = 0.9):
    """Divide dU/dmu by its running RMS (bias-corrected, as Adam's second moment).
    Returns (scaled g, new v, new n); the first call returns sign(g)."""
    v = beta * v + (1 - beta) * g * g
    n = n + 1
    rms = (v / (1 - beta ** n)) ** 0.5
    return (g / rms if rms > 0 else 0.0), v, n


def update_mu(mu, g_meta, g_H, eta_meta, eta_H, mu_min, mu_max):
    """mu <- clip(mu + eta_meta * g_meta + eta_H * g_H, mu_min, mu_max)."""
    return float(min(max(mu + eta_meta * g_meta + eta_H * g_H, mu_min), mu_max))


class MuController:
    """mu and everything that moves it: H_target, the running mean square of dU/dmu, and
    which terms are on. The loop asks `meta_due(k)` (is dU/dmu wanted at main-phase step k?) and
    calls `update` once per main-phase step. All state is plain numbers (`state_dict`)."""

    def __init__(self, method: Method, mu0, mu_min, mu_max, eta_meta, eta_H, meta_every,
                 H_target=None, H_target_ema=0.0):
        self.entropy_term, self.meta_term, self.mixes, self.every = (
            method.entropy_term, method.meta_term, method.mixes, meta_every)
        self.eta_meta, self.eta_H, self.mu_min, self.mu_max = eta_meta, eta_H, mu_min, mu_max
        # 0: the spec's target, measured once; > 0: it follows H (an alternative)
        self.H_target_ema = H_target_ema
        self.mu, self.H_target, self.meta_v, self.meta_n, self.rejected = (
            float(mu0), H_target, 0.0, 0, 0)
        # meta-gradients due but silent: every validation group's rewards were equal
        self.silent = 0

    def metrics(self) -> dict:
        return {"mu": self.mu if self.mixes else None, "H_target": self.H_target, "meta_grad": None}

    def meta_due(self, k: int, H: float) -> bool:
        """Is dU/dmu wanted at main-phase step k? Not when the entropy is non-finite: the
        update would be refused anyway."""
        return self.meta_term and k % self.every == 0 and math.isfinite(H)

    def update(self, H: float, dU_dmu=None, losses_finite: bool = True,
               silent: bool = False) -> dict:
        """One step: set H_target on the first call, then move mu. Every input, and every new
        value computed from them, is checked before anything is stored; if one is non-finite
        nothing changes and the step counts as rejected. silent: the meta-gradient was due, but
        every validation group's rewards were equal, so dU/dmu is exactly 0 and says nothing: it
        is counted (meta_silent) and treated as no meta-gradient, neither moving mu nor entering
        the running RMS (ten such zeros would otherwise shrink the RMS and scale the next real
        value to 2.6)."""
        if silent:
            dU_dmu = None
        H_target = H if self.H_target is None else self.H_target  # the warmed-up policy's entropy
        g_H = entropy_signal(H_target, H) if self.entropy_term else 0.0
        g_meta, v, n = 0.0, self.meta_v, self.meta_n
        if dU_dmu is not None and math.isfinite(dU_dmu):
            g_meta, v, n = normalize_meta_grad(dU_dmu, v, n)
        mu = update_mu(self.mu, g_meta, g_H, self.eta_meta, self.eta_H, self.mu_min, self.mu_max)
        new = [H, H_target, g_H, g_meta, v, mu] + ([dU_dmu] if dU_dmu is not None else [])
        if not losses_finite or not all(math.isfinite(x) for x in new):
            self.rejected += 1
            return {"mu": self.mu, "H_target": self.H_target, "meta_grad": dU_dmu,
                    "mu_rejected": self.rejected,
                    # (a rejected step counts as rejected, not as silent)
                    "meta_silent": self.silent}
        self.mu, self.meta_v, self.meta_n, self.silent = mu, v, n, self.silent + silent
        # (unchanged when H_target_ema = 0)
        self.H_target = H_target + self.H_target_ema * (H - H_target)
        return {"mu": mu, "H_target": H_target, "meta_grad": dU_dmu,
                "meta_grad_scaled": g_meta if dU_dmu is not None else None,
                "mu_rejected": self.rejected, "meta_silent": self.silent}

    def state_dict(self) -> dict:
        return {k: getattr(self, k)
                for k in ("mu", "H_target", "meta_v", "meta_n", "rejected", "silent")}

    def load_state_dict(self, state: dict):
        for k, v in state.items():
            setattr(self, k, v)


# ---------------------------------------------------------------------------- meta-gradient
# U is a callable U(params, chunk) -> that micro-batch's share of U_sur (they add up to U_sur);
# params maps names to tensors; chunks are the micro-batches (slices of the validation rows).
def lookahead_step(k, g_rl: dict, g_sft: dict, mu, alpha: float):
    """alpha [(1 - mu) g_RL + mu g_SFT] for tensor k (a gradient not computed counts as 0; None
    when neither was); mu may be a tensor with grad."""
    if k not in g_rl and k not in g_sft:
        return None
    return (alpha * ((1 - mu) * g_rl[k] if k in g_rl else 0)
            + alpha * (mu * g_sft[k] if k in g_sft else 0))


def lookahead(params: dict, g_rl: dict, g_sft: dict, mu, alpha: float) -> dict:
    """theta'(mu) = theta - alpha [(1 - mu) g_RL + mu g_SFT], as new tensors (the definition; the
    estimators move the weights in place instead, `moved_to_lookahead`)."""
    steps = {k: lookahead_step(k, g_rl, g_sft, mu, alpha) for k in params}
    return {k: p if steps[k] is None else p - steps[k] for k, p in params.items()}


@contextlib.contextmanager
def moved_to_lookahead(params: dict, g_rl: dict, g_sft: dict, mu: float, alpha: float):
    """Inside the block the parameters ARE theta'(mu): moved in place, one tensor's step at a time,
    so the look-ahead costs no parameter-sized copy; on exit the same step is added back. Each
    weight comes back within one rounding (1 ulp) of where it was: exact in value would need a
    copy of theta, the very buffer this avoids."""
    def move(sign):
        with torch.no_grad():
            for k, p in params.items():
                step = lookahead_step(k, g_rl, g_sft, mu, alpha)
                if step is not None:
                    p.add_(step.to(p), alpha=sign)
    move(-1)
    try:
        yield params
    finally:
        move(+1)


def local(t):
    """This process's slice of a tensor that FSDP splits across processes (a DTensor), else t.
    Dots of slices are partial sums: the trainer adds them up over processes."""
    return t.to_local() if hasattr(t, "to_local") else t


def directional_derivatives(U, params: dict, g_rl: dict, g_sft: dict, chunks):
    """(<grad U, g_SFT>, <grad U, g_RL>) at the parameters' current values, with no
    parameter-sized gradient buffer: a hook dots each tensor's gradient with g_SFT and g_RL the
    moment it is accumulated (per micro-batch: the dots are linear, so they add up) and frees it.
    Their .grad is handed back as it was."""
    dots = torch.zeros(2, dtype=torch.float64)
    saved, hooks = {k: p.grad for k, p in params.items()}, []
    for k, t in params.items():
        t.grad = None
        if t.requires_grad and (k in g_rl or k in g_sft):
            def hook(t, k=k):
                g = local(t.grad).reshape(-1)
                for i, other in enumerate((g_sft, g_rl)):
                    if k in other:
                        dots[i] += torch.dot(g, local(other[k]).reshape(-1).to(g)).double().cpu()
                t.grad = None
            hooks.append(t.register_post_accumulate_grad_hook(hook))
    try:
        accumulate(lambda chunk: (U(chunk), {}), chunks)
    finally:
        for h in hooks:
            h.remove()
        for k, p in params.items():
            p.grad = saved[k]
    return dots[0].item(), dots[1].item()


# Each estimator takes U(chunk): this micro-batch's share of U_sur, evaluated at the model's
# current weights (whose tensors are `params`); the weights are where they were on return.
def meta_grad_first_order(U, params, g_rl, g_sft, mu, alpha, chunks) -> float:
    """The paper's estimate: dU/dmu ~ -alpha <grad U(theta), g_SFT - g_RL>."""
    at_sft, at_rl = directional_derivatives(U, params, g_rl, g_sft, chunks)
    return -alpha * (at_sft - at_rl)


def meta_grad_autograd(U, params, g_rl, g_sft, mu, alpha, chunks) -> float:
    """Exact dU_sur(theta'(mu))/dmu. theta'(mu) is linear in mu, so by the chain rule
    dU/dmu = <grad U(theta'), dtheta'/dmu> = -alpha <grad U(theta'), g_SFT - g_RL> exactly, with
    grad U(theta') by autograd at the weights moved to theta'. (Backpropagating into a leaf mu
    through the look-ahead gives the same number, a test checks it, but holds theta' and several
    parameter-sized temporaries; this holds one tensor's gradient at a time.)"""
    with moved_to_lookahead(params, g_rl, g_sft, mu, alpha):
        return meta_grad_first_order(U, params, g_rl, g_sft, mu, alpha, chunks)


def fd_step(params, g_rl, g_sft, alpha) -> float:
    """The fd step h. A fixed h = 1e-3 drowns in round-off outside float64: at alpha = 1e-6 the
    probe alpha h (g_SFT - g_RL) is far below one float32 ulp of the weights, and fd returns 0 or
    the wrong sign. h is a length along mu, so we size it by what it does to the weights: the
    largest relative change of any weight tensor, alpha h RMS(g_SFT - g_RL) / RMS(theta), is
    delta = 0.1 eps^(1/3) (eps^(1/3) balances round-off against curvature in a central
    difference; the 0.1 because U's curvature in the weights is large): 6e-7 in float64, 5e-4
    in float32. Measured on the tiny model, fd's error against autograd is then about 1e-9
    (float64) and 6e-4 (float32) relative, at alpha = 1e-3 and 1e-6 alike. In bfloat16 no
    step is both above round-off and small enough for U to be linear (20% error or more at every
    step we tried), so the trainer refuses fd there."""
    p0 = next(iter(params.values()))
    rms = lambda t: float(t.detach().double().pow(2).mean().sqrt())
    n = sum(p.numel() for p in params.values())
    theta_rms = math.sqrt(sum(float(p.detach().double().pow(2).sum()) for p in params.values()) / n)
    # dtheta'/dmu = -alpha diff
    diff = {k: g_sft.get(k, 0) - g_rl.get(k, 0) for k in set(g_rl) | set(g_sft)}
    ratios = [(rms(params[k]) or theta_rms or 1.0) / (alpha * rms(d))
              for k, d in diff.items() if alpha * rms(d) > 0]
    return 0.1 * torch.finfo(p0.dtype).eps ** (1 / 3) * min(ratios, default=1.0)


@torch.no_grad()
def meta_grad_fd(U, params, g_rl, g_sft, mu, alpha, chunks, h=None) -> float:
    """Central finite difference [U(theta'(mu+h)) - U(theta'(mu-h))] / 2h, summed in float64."""
    h = fd_step(params, g_rl, g_sft, alpha) if h is None else h

    def U_at(m):
        with moved_to_lookahead(params, g_rl, g_sft, m, alpha):
            return accumulate(lambda chunk: (U(chunk).double(), {}), chunks, backward=False)["loss"]
    return (U_at(mu + h) - U_at(mu - h)) / (2 * h)


META_GRADS = {"first-order": meta_grad_first_order, "autograd": meta_grad_autograd,
              "fd": meta_grad_fd}
