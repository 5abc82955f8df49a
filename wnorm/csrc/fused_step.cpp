// wnorm's optimizer-side weight normalization: one pass per row of v that turns the gradient of
// the plain weight w = g v/||v|| into the gradients of g and v (Salimans & Kingma 2016, eqs. 3-4),
// applies torch.optim.SGD's or torch.optim.Adam's update to g and v and writes the new w (w's
// gradient is only read: wnorm/optim.py drops it after the step).
//
// Each row of v (one output unit) is read from memory once; the second and third sweeps over
// the row hit the L1 cache. Rows are independent, so at::parallel_for splits them over threads.
// The arithmetic follows torch/optim/sgd.py and adam.py (single-tensor path) operation by
// operation, so the trajectory equals torch's to rounding; wnorm/optim.py checks the inputs.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <tuple>
#include <vector>

namespace {

struct Sgd {
  double lr, momentum, dampening, weight_decay;
  bool nesterov, maximize;
};

struct Adam {
  double lr, beta1, beta2, eps, weight_decay;
  bool decoupled, maximize;
};

int64_t grain_rows(int64_t k) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(k, 1)); }

// (dot(gw_i, v_i), ||v_i||^2), summed in the row's dtype over SIMD lanes, as ATen's norm.
template <typename T>
inline void row_sums(const T* gw, const T* v, int64_t k, double& dot, double& nn) {
  T d = 0, s = 0;
#pragma omp simd reduction(+ : d, s)
  for (int64_t j = 0; j < k; ++j) {
    d += gw[j] * v[j];
    s += v[j] * v[j];
  }
  dot = d;
  nn = s;
}

// Eqs. 3-4 for row i: dL/dg = gw.v/||v|| and dL/dv = a gw - b v, with a = g/||v|| and
// b = g gw.v/||v||^3 (sign -1 for maximize).
struct RowGrad {
  double dot, n;  // gw.v and ||v||
  double a, b;
};

template <typename T>
inline RowGrad row_grad(const T* gw, const T* v, int64_t k, double g, double sign) {
  double dot, nn;
  row_sums(gw, v, k, dot, nn);
  const double n = std::sqrt(nn);
  return {dot, n, sign * g / n, sign * g * dot / (nn * n)};
}

// ||v_i||^2 in the row's dtype, in a fixed order: 16 running sums over blocks of 16 elements,
// then the tail, then the 16 sums pairwise. The order does not depend on the compiler's
// vectorization or on v's alignment, and the function is not inlined, so the step's new w and
// plain_weight() (the first w of a run resumed from g and v) run the same instructions on the
// same numbers: a resumed run continues bit for bit.
template <typename T>
__attribute__((noinline)) T row_sumsq(const T* __restrict v, int64_t k) {
  T acc[16] = {};
  int64_t j = 0;
  for (; j + 16 <= k; j += 16) {
#pragma omp simd
    for (int l = 0; l < 16; ++l) acc[l] += v[j + l] * v[j + l];
  }
  for (int l = 0; j < k; ++j, ++l) acc[l] += v[j] * v[j];
  for (int h = 8; h > 0; h /= 2) {
    for (int l = 0; l < h; ++l) acc[l] += acc[l + h];
  }
  return acc[0];
}

// w_i = g_i v_i / ||v_i||: the one place a plain weight row is computed from g and v.
template <typename T>
inline void write_w_row(T* __restrict w, const T* __restrict v, int64_t k, T g) {
  const T scale = T(double(g) / std::sqrt(double(row_sumsq(v, k))));
#pragma omp simd
  for (int64_t j = 0; j < k; ++j) w[j] = scale * v[j];
}

// SGD on rows [begin, end) of one layer: w, gw, v, vbuf are (rows, k) contiguous; g, gbuf have
// one entry per row. The options are template arguments so that each inner loop is branch-free.
template <typename T, bool MOM, bool NESTEROV, bool WD>
void sgd_rows(T* __restrict w, T* __restrict gw, T* __restrict v, T* __restrict g,
              T* __restrict vbuf, T* __restrict gbuf, int64_t begin, int64_t end, int64_t k,
              const Sgd o, const bool first) {
  const T lr = T(o.lr), mom = T(o.momentum);
  // first step (buffers are zeros): buf = 0 * 0 + 1 * d = d, as torch's clone(grad)
  const T keep = first ? T(1) : T(1 - o.dampening), old = first ? T(0) : mom;
  const T wd = T(o.weight_decay);
  const double sign = o.maximize ? -1.0 : 1.0;
  for (int64_t i = begin; i < end; ++i) {
    T* __restrict gwi = gw + i * k;
    T* __restrict vi = v + i * k;
    T* __restrict bi = MOM ? vbuf + i * k : nullptr;
    const RowGrad r = row_grad(gwi, vi, k, double(g[i]), sign);
    const T a = T(r.a), b = T(r.b);
#pragma omp simd
    for (int64_t j = 0; j < k; ++j) {
      T d = a * gwi[j] - b * vi[j];
      if (WD) d = d + wd * vi[j];
      T step = d;
      if (MOM) {
        const T buf = old * bi[j] + keep * d;
        bi[j] = buf;
        step = NESTEROV ? d + mom * buf : buf;
      }
      vi[j] = vi[j] + (-lr) * step;
    }
    T dg = T(sign * r.dot / r.n);
    if (WD) dg = dg + wd * g[i];
    if (MOM) {
      const T buf = old * gbuf[i] + keep * dg;
      gbuf[i] = buf;
      dg = NESTEROV ? dg + mom * buf : buf;
    }
    g[i] = g[i] + (-lr) * dg;
    write_w_row(w + i * k, vi, k, g[i]);
  }
}

template <typename T, bool MOM, bool NESTEROV, bool WD>
void sgd_layer_t(T* w, T* gw, T* v, T* g, T* vbuf, T* gbuf, int64_t rows, int64_t k,
                 const Sgd& o, bool first) {
  if (rows * k <= 65536) {  // small: no thread hand-off
    sgd_rows<T, MOM, NESTEROV, WD>(w, gw, v, g, vbuf, gbuf, 0, rows, k, o, first);
    return;
  }
  at::parallel_for(0, rows, grain_rows(k), [&](int64_t begin, int64_t end) {
    sgd_rows<T, MOM, NESTEROV, WD>(w, gw, v, g, vbuf, gbuf, begin, end, k, o, first);
  });
}

template <typename T>
void sgd_layer(T* w, T* gw, T* v, T* g, T* vbuf, T* gbuf, int64_t rows, int64_t k,
               const Sgd& o, bool first) {
  const bool mom = o.momentum != 0, wd = o.weight_decay != 0, nes = o.nesterov && mom;
#define WNORM_SGD(M, N, W) \
  if (mom == M && nes == N && wd == W) \
    return sgd_layer_t<T, M, N, W>(w, gw, v, g, vbuf, gbuf, rows, k, o, first);
  WNORM_SGD(false, false, false) WNORM_SGD(false, false, true)
  WNORM_SGD(true, false, false) WNORM_SGD(true, false, true)
  WNORM_SGD(true, true, false) WNORM_SGD(true, true, true)
#undef WNORM_SGD
}

// Adam on rows [begin, end) of one layer, element by element as adam.py's single-tensor path:
// decoupled decay or L2, exp_avg.lerp_(d, 1 - beta1), exp_avg_sq.mul_(beta2).addcmul_(d, d),
// denom = sqrt(exp_avg_sq) / sqrt(bias_correction2) + eps, p -= lr / bias_correction1 * m / denom.
template <typename T, bool L2, bool DEC>
inline T adam_elem(T p, T d, T& m, T& s, T lr, T wd, T omb1, T b2, T omb2, T size, T bc2,
                   T eps) {
  if (DEC) p = p * (T(1) - lr * wd);
  if (L2) d = d + wd * p;
  m = m + omb1 * (d - m);  // ATen's lerp for weight 1 - beta1 < 0.5 (checked in Python)
  s = s * b2 + omb2 * (d * d);
  return p + (-size) * (m / (std::sqrt(s) / bc2 + eps));
}

template <typename T, bool L2, bool DEC>
void adam_rows(T* __restrict w, T* __restrict gw, T* __restrict v, T* __restrict g,
               T* __restrict vm, T* __restrict vs, T* __restrict gm, T* __restrict gs,
               int64_t begin, int64_t end, int64_t k, const Adam o, const double vstep,
               const double gstep) {
  const T lr = T(o.lr), wd = T(o.weight_decay), b2 = T(o.beta2), eps = T(o.eps);
  const T omb1 = T(1 - o.beta1), omb2 = T(1 - o.beta2);
  const double sign = o.maximize ? -1.0 : 1.0;
  const T v_size = T(o.lr / (1 - std::pow(o.beta1, vstep)));
  const T v_bc2 = T(std::sqrt(1 - std::pow(o.beta2, vstep)));
  const T g_size = T(o.lr / (1 - std::pow(o.beta1, gstep)));
  const T g_bc2 = T(std::sqrt(1 - std::pow(o.beta2, gstep)));
  for (int64_t i = begin; i < end; ++i) {
    T* __restrict gwi = gw + i * k;
    T* __restrict vi = v + i * k;
    T* __restrict mi = vm + i * k;
    T* __restrict si = vs + i * k;
    const RowGrad r = row_grad(gwi, vi, k, double(g[i]), sign);
    const T a = T(r.a), b = T(r.b);
#pragma omp simd
    for (int64_t j = 0; j < k; ++j) {
      const T d = a * gwi[j] - b * vi[j];
      T p = vi[j];
      if (DEC) p = p * (T(1) - lr * wd);
      const T dd = L2 ? d + wd * p : d;
      const T m = mi[j] + omb1 * (dd - mi[j]);
      const T s = si[j] * b2 + omb2 * (dd * dd);
      mi[j] = m;
      si[j] = s;
      vi[j] = p + (-v_size) * (m / (std::sqrt(s) / v_bc2 + eps));
    }
    g[i] = adam_elem<T, L2, DEC>(g[i], T(sign * r.dot / r.n), gm[i], gs[i], lr, wd, omb1, b2, omb2,
                                 g_size, g_bc2, eps);
    write_w_row(w + i * k, vi, k, g[i]);
  }
}

template <typename T, bool L2, bool DEC>
void adam_layer_t(T* w, T* gw, T* v, T* g, T* vm, T* vs, T* gm, T* gs, int64_t rows,
                  int64_t k, const Adam& o, double vstep, double gstep) {
  if (rows * k <= 65536) {
    adam_rows<T, L2, DEC>(w, gw, v, g, vm, vs, gm, gs, 0, rows, k, o, vstep, gstep);
    return;
  }
  at::parallel_for(0, rows, grain_rows(k), [&](int64_t begin, int64_t end) {
    adam_rows<T, L2, DEC>(w, gw, v, g, vm, vs, gm, gs, begin, end, k, o, vstep, gstep);
  });
}

template <typename T>
void adam_layer(T* w, T* gw, T* v, T* g, T* vm, T* vs, T* gm, T* gs, int64_t rows,
                int64_t k, const Adam& o, double vstep, double gstep) {
  const bool l2 = o.weight_decay != 0 && !o.decoupled, dec = o.weight_decay != 0 && o.decoupled;
  if (l2) return adam_layer_t<T, true, false>(w, gw, v, g, vm, vs, gm, gs, rows, k, o, vstep, gstep);
  if (dec) return adam_layer_t<T, false, true>(w, gw, v, g, vm, vs, gm, gs, rows, k, o, vstep, gstep);
  adam_layer_t<T, false, false>(w, gw, v, g, vm, vs, gm, gs, rows, k, o, vstep, gstep);
}

void check(const at::Tensor& t, const at::Tensor& like, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() && t.scalar_type() == like.scalar_type(),
              "wnorm fused step: ", what, " must be a contiguous CPU tensor of dtype ",
              like.scalar_type());
}

void bump(const at::Tensor& t) { torch::autograd::impl::bump_version(t); }

}  // namespace

namespace {

double next_step(const at::Tensor& step) {
  // state["step"] is a 0-dim float tensor (torch.optim.Adam): increment it in place
  TORCH_CHECK(step.numel() == 1 && step.device().is_cpu(), "wnorm fused step: bad Adam step");
  if (step.scalar_type() == at::kFloat) return ++*step.data_ptr<float>();
  TORCH_CHECK(step.scalar_type() == at::kDouble, "wnorm fused step: Adam step must be float");
  return ++*step.data_ptr<double>();
}

}  // namespace

// Rows of layer l: rows[l] (v is (rows, k) in memory, k = numel / rows).
void sgd_step(const std::vector<at::Tensor>& w, const std::vector<at::Tensor>& gw,
              const std::vector<at::Tensor>& v, const std::vector<at::Tensor>& g,
              const std::vector<at::Tensor>& vbuf, const std::vector<at::Tensor>& gbuf,
              const std::vector<int64_t>& rows, const std::vector<bool>& first, double lr,
              double momentum, double dampening, double weight_decay, bool nesterov,
              bool maximize) {
  const Sgd o{lr, momentum, dampening, weight_decay, nesterov, maximize};
  for (size_t l = 0; l < v.size(); ++l) {
    const at::Tensor& t = v[l];
    check(w[l], t, "w"), check(gw[l], t, "w.grad"), check(g[l], t, "g");
    if (momentum != 0) check(vbuf[l], t, "momentum_buffer"), check(gbuf[l], t, "momentum_buffer");
    const int64_t r = rows[l], k = t.numel() / r;
    TORCH_CHECK(g[l].numel() == r && w[l].numel() == t.numel() && gw[l].numel() == t.numel(),
                "wnorm fused step: shapes of w, w.grad, g and v disagree");
    AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), "wnorm_sgd_step", [&] {
      scalar_t* vb = momentum != 0 ? vbuf[l].data_ptr<scalar_t>() : nullptr;
      scalar_t* gb = momentum != 0 ? gbuf[l].data_ptr<scalar_t>() : nullptr;
      sgd_layer<scalar_t>(w[l].data_ptr<scalar_t>(), gw[l].data_ptr<scalar_t>(),
                          t.data_ptr<scalar_t>(), g[l].data_ptr<scalar_t>(), vb, gb, r, k, o,
                          first[l]);
    });
    bump(w[l]), bump(t), bump(g[l]);
  }
}

void adam_step(const std::vector<at::Tensor>& w, const std::vector<at::Tensor>& gw,
               const std::vector<at::Tensor>& v, const std::vector<at::Tensor>& g,
               const std::vector<at::Tensor>& vm, const std::vector<at::Tensor>& vs,
               const std::vector<at::Tensor>& gm, const std::vector<at::Tensor>& gs,
               const std::vector<at::Tensor>& vstep, const std::vector<at::Tensor>& gstep,
               const std::vector<int64_t>& rows, double lr, double beta1, double beta2,
               double eps, double weight_decay, bool decoupled, bool maximize) {
  const Adam o{lr, beta1, beta2, eps, weight_decay, decoupled, maximize};
  for (size_t l = 0; l < v.size(); ++l) {
    const at::Tensor& t = v[l];
    check(w[l], t, "w"), check(gw[l], t, "w.grad"), check(g[l], t, "g");
    check(vm[l], t, "exp_avg"), check(vs[l], t, "exp_avg_sq");
    check(gm[l], t, "exp_avg"), check(gs[l], t, "exp_avg_sq");
    const int64_t r = rows[l], k = t.numel() / r;
    TORCH_CHECK(g[l].numel() == r && w[l].numel() == t.numel() && gw[l].numel() == t.numel(),
                "wnorm fused step: shapes of w, w.grad, g and v disagree");
    const double sv = next_step(vstep[l]), sg = next_step(gstep[l]);
    AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), "wnorm_adam_step", [&] {
      adam_layer<scalar_t>(w[l].data_ptr<scalar_t>(), gw[l].data_ptr<scalar_t>(),
                           t.data_ptr<scalar_t>(), g[l].data_ptr<scalar_t>(),
                           vm[l].data_ptr<scalar_t>(), vs[l].data_ptr<scalar_t>(),
                           gm[l].data_ptr<scalar_t>(), gs[l].data_ptr<scalar_t>(), r, k, o, sv,
                           sg);
    });
    bump(w[l]), bump(t), bump(g[l]);
  }
}

// w = g v/||v|| row by row with the step's own arithmetic (write_w_row), for a weight whose g
// or v changed outside the step (attach, resume, load, data init): w is then what the step
// would have written for the same g and v.
void plain_weight(at::Tensor w, const at::Tensor& v, const at::Tensor& g) {
  check(w, v, "w"), check(v, v, "v"), check(g, v, "g");
  const int64_t r = g.numel();
  TORCH_CHECK(r > 0 && w.numel() == v.numel() && v.numel() % r == 0,
              "wnorm plain_weight: shapes of w, g and v disagree");
  const int64_t k = v.numel() / r;
  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "wnorm_plain_weight", [&] {
    scalar_t* wp = w.data_ptr<scalar_t>();
    const scalar_t* vp = v.data_ptr<scalar_t>();
    const scalar_t* gp = g.data_ptr<scalar_t>();
    auto rows = [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) write_w_row(wp + i * k, vp + i * k, k, gp[i]);
    };
    if (r * k <= 65536) {
      rows(0, r);
    } else {
      at::parallel_for(0, r, grain_rows(k), rows);
    }
  });
  bump(w);
}

// ---------------------------------------------------------------------------------------------
// Parameters without weight norm (biases, other layers): the same rules, element by element,
// so that one step needs no second pass through torch's per-parameter loop.

namespace {

template <typename T>
void sgd_plain_range(T* __restrict p, const T* __restrict gr, T* __restrict buf, int64_t b,
                     int64_t e, const Sgd o, bool first) {
  const T lr = T(o.lr), mom = T(o.momentum), wd = T(o.weight_decay);
  const T keep = first ? T(1) : T(1 - o.dampening), old = first ? T(0) : mom;
  const T sign = o.maximize ? T(-1) : T(1);
  const bool use_mom = o.momentum != 0, use_wd = o.weight_decay != 0;
#pragma omp simd
  for (int64_t j = b; j < e; ++j) {
    T d = sign * gr[j];
    if (use_wd) d = d + wd * p[j];
    if (use_mom) {
      const T bj = old * buf[j] + keep * d;
      buf[j] = bj;
      d = o.nesterov ? d + mom * bj : bj;
    }
    p[j] = p[j] + (-lr) * d;
  }
}

template <typename T, bool L2, bool DEC>
void adam_plain_range(T* __restrict p, const T* __restrict gr, T* __restrict m,
                      T* __restrict s, int64_t b, int64_t e, T lr, T wd, T omb1, T b2, T omb2,
                      T size, T bc2, T eps, T sign) {
#pragma omp simd
  for (int64_t j = b; j < e; ++j) {
    T q = p[j], d = sign * gr[j];
    if (DEC) q = q * (T(1) - lr * wd);
    if (L2) d = d + wd * q;
    const T mj = m[j] + omb1 * (d - m[j]);
    const T sj = s[j] * b2 + omb2 * (d * d);
    m[j] = mj;
    s[j] = sj;
    p[j] = q + (-size) * (mj / (std::sqrt(sj) / bc2 + eps));
  }
}

// Elements [0, n) in chunks over torch's threads when there are enough of them.
template <typename F>
void over_elements(int64_t n, const F& f) {
  if (n <= 65536) {
    f(0, n);
    return;
  }
  at::parallel_for(0, n, 32768, f);
}

}  // namespace

void sgd_plain_step(const std::vector<at::Tensor>& p, const std::vector<at::Tensor>& grad,
                    const std::vector<at::Tensor>& buf, const std::vector<bool>& first,
                    double lr, double momentum, double dampening, double weight_decay,
                    bool nesterov, bool maximize) {
  const Sgd o{lr, momentum, dampening, weight_decay, nesterov, maximize};
  for (size_t l = 0; l < p.size(); ++l) {
    const at::Tensor& t = p[l];
    check(grad[l], t, "grad");
    if (momentum != 0) check(buf[l], t, "momentum_buffer");
    TORCH_CHECK(t.is_contiguous() && grad[l].numel() == t.numel(), "wnorm fused step: bad param");
    AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), "wnorm_sgd_plain", [&] {
      scalar_t* pp = t.data_ptr<scalar_t>();
      const scalar_t* gg = grad[l].data_ptr<scalar_t>();
      scalar_t* bb = momentum != 0 ? buf[l].data_ptr<scalar_t>() : nullptr;
      const bool fl = first[l];
      over_elements(t.numel(), [&](int64_t b, int64_t e) {
        sgd_plain_range<scalar_t>(pp, gg, bb, b, e, o, fl);
      });
    });
    bump(t);
  }
}

void adam_plain_step(const std::vector<at::Tensor>& p, const std::vector<at::Tensor>& grad,
                     const std::vector<at::Tensor>& m, const std::vector<at::Tensor>& s,
                     const std::vector<at::Tensor>& step, double lr, double beta1, double beta2,
                     double eps, double weight_decay, bool decoupled, bool maximize) {
  const bool l2 = weight_decay != 0 && !decoupled, dec = weight_decay != 0 && decoupled;
  for (size_t l = 0; l < p.size(); ++l) {
    const at::Tensor& t = p[l];
    check(grad[l], t, "grad"), check(m[l], t, "exp_avg"), check(s[l], t, "exp_avg_sq");
    TORCH_CHECK(t.is_contiguous() && grad[l].numel() == t.numel(), "wnorm fused step: bad param");
    const double st = next_step(step[l]);
    AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), "wnorm_adam_plain", [&] {
      using T = scalar_t;
      const T size = T(lr / (1 - std::pow(beta1, st))), bc2 = T(std::sqrt(1 - std::pow(beta2, st)));
      const T tlr = T(lr), wd = T(weight_decay), b2 = T(beta2), e_ = T(eps);
      const T omb1 = T(1 - beta1), omb2 = T(1 - beta2), sign = maximize ? T(-1) : T(1);
      T* pp = t.data_ptr<T>();
      const T* gg = grad[l].data_ptr<T>();
      T* mm = m[l].data_ptr<T>();
      T* ss = s[l].data_ptr<T>();
      over_elements(t.numel(), [&](int64_t b, int64_t e) {
        if (l2)
          adam_plain_range<T, true, false>(pp, gg, mm, ss, b, e, tlr, wd, omb1, b2, omb2, size,
                                           bc2, e_, sign);
        else if (dec)
          adam_plain_range<T, false, true>(pp, gg, mm, ss, b, e, tlr, wd, omb1, b2, omb2, size,
                                           bc2, e_, sign);
        else
          adam_plain_range<T, false, false>(pp, gg, mm, ss, b, e, tlr, wd, omb1, b2, omb2, size,
                                            bc2, e_, sign);
      });
    });
    bump(t);
  }
}

// wnorm/csrc/activation.cpp, wnorm/csrc/data_init.cpp, wnorm/csrc/conv_mean.cpp
std::vector<at::Tensor> act_forward_sum(const at::Tensor& u, double slope);
at::Tensor act_backward_add_(at::Tensor g, const at::Tensor& u, const at::Tensor& c, double slope);
std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<int64_t>> data_init_layer(
    const at::Tensor& r, int64_t axis, const at::Tensor& v, int64_t dim, at::Tensor g,
    c10::optional<at::Tensor> bias, double init_scale, c10::optional<at::Tensor> offset);
std::vector<at::Tensor> conv_mean_forward(const at::Tensor& xs, const at::Tensor& w,
                                          const std::vector<at::Tensor>& taps, int64_t groups,
                                          double count);
c10::optional<at::Tensor> conv_mean_backward(const at::Tensor& gsum, const at::Tensor& w,
                                             const at::Tensor& sums,
                                             const std::vector<at::Tensor>& taps, int64_t groups,
                                             double count, c10::optional<at::Tensor> gw,
                                             bool need_x);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("sgd_step", &sgd_step, "weight-normalized SGD step (CPU)");
  m.def("adam_step", &adam_step, "weight-normalized Adam step (CPU)");
  m.def("sgd_plain_step", &sgd_plain_step, "SGD step of plain parameters (CPU)");
  m.def("adam_plain_step", &adam_plain_step, "Adam step of plain parameters (CPU)");
  m.def("plain_weight", &plain_weight, "w = g v/||v|| per row, as the fused steps write it (CPU)");
  m.def("act_forward_sum", &act_forward_sum, "leaky ReLU and its batch sum in one pass (CPU)");
  m.def("act_backward_add_", &act_backward_add_,
        "leaky ReLU backward of (gradient + batch-constant correction), in place (CPU)");
  m.def("data_init_layer", &data_init_layer,
        "one layer's data-dependent init from its raw output r = v.x (CPU)");
  m.def("conv_mean_forward", &conv_mean_forward,
        "batch mean of a convolution's output from its input's batch sum (CPU)");
  m.def("conv_mean_backward", &conv_mean_backward,
        "the weight- and input-gradient terms of conv_mean_forward's mean (CPU)");
}
