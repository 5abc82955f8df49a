// Leaky ReLU (ReLU: slope 0) fused with the two reductions that mean-only batch norm fused into
// the next layer needs (wnorm/mean_only_fused.py): forward, the activation and the sum of its
// output over the batch in one pass; backward, the batch-constant correction of the input
// gradient added inside the activation's own backward pass. Each saves one sweep over an
// activation tensor per layer. Inputs: contiguous CPU float/double tensors (N, ...) viewed as
// N rows of J values; the batch sum and the correction have J values.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

namespace {

constexpr int64_t kGrain = 4096;  // values per task

void check(const at::Tensor& t, const at::Tensor& like, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() && t.scalar_type() == like.scalar_type(),
              "wnorm activation kernel: ", what, " must be a contiguous CPU tensor of dtype ",
              like.scalar_type());
}

}  // namespace

// (A #pragma cannot sit inside AT_DISPATCH's macro argument: the loops are templates.)
// Branch-free selects (max/min, masks) vectorize; a ternary compiled to a branch ran 12x slower
// on random signs. ReLU (Leaky = false) never multiplies by the slope: 0 * -inf would be NaN.
template <typename T, bool Leaky>
inline T act(T v, T sl) {
  return Leaky ? std::max(v, T(0)) + sl * std::min(v, T(0)) : std::max(v, T(0));
}

// Four rows at a time: the sum is loaded and stored once per four values written, so the pass
// costs what the activation alone costs (with one row at a time it was 20-30% slower, with the
// sum blocked to L1 or not).
template <typename T, bool Leaky>
void forward_sum(const T* up, T* zp, T* sp, int64_t n_rows, int64_t j_len, T sl) {
  at::parallel_for(0, j_len, kGrain, [&](int64_t b, int64_t e) {
    int64_t n = 0;
    for (; n + 4 <= n_rows; n += 4) {
      const T* __restrict u0 = up + n * j_len;
      const T* __restrict u1 = u0 + j_len;
      const T* __restrict u2 = u1 + j_len;
      const T* __restrict u3 = u2 + j_len;
      T* __restrict z0 = zp + n * j_len;
      T* __restrict z1 = z0 + j_len;
      T* __restrict z2 = z1 + j_len;
      T* __restrict z3 = z2 + j_len;
      T* __restrict s = sp;
#pragma omp simd
      for (int64_t j = b; j < e; ++j) {
        const T o0 = act<T, Leaky>(u0[j], sl), o1 = act<T, Leaky>(u1[j], sl);
        const T o2 = act<T, Leaky>(u2[j], sl), o3 = act<T, Leaky>(u3[j], sl);
        z0[j] = o0, z1[j] = o1, z2[j] = o2, z3[j] = o3;
        s[j] += (o0 + o1) + (o2 + o3);
      }
    }
    for (; n < n_rows; ++n) {
      const T* __restrict ur = up + n * j_len;
      T* __restrict zr = zp + n * j_len;
      T* __restrict s = sp;
#pragma omp simd
      for (int64_t j = b; j < e; ++j) {
        const T o = act<T, Leaky>(ur[j], sl);
        zr[j] = o;
        s[j] += o;
      }
    }
  });
}

template <typename T, bool Leaky>
void backward_add(T* gp, const T* up, const T* cp, int64_t n_rows, int64_t j_len, T sl) {
  at::parallel_for(0, j_len, kGrain, [&](int64_t b, int64_t e) {
    for (int64_t n = 0; n < n_rows; ++n) {
      T* gr = gp + n * j_len;
      const T* ur = up + n * j_len;
#pragma omp simd
      for (int64_t j = b; j < e; ++j) {
        const T v = gr[j] + cp[j];
        if (Leaky) {
          const T m = static_cast<T>(ur[j] > 0);  // 0/1 mask
          gr[j] = v * (sl + (T(1) - sl) * m);
        } else {
          gr[j] = ur[j] > 0 ? v : T(0);  // a blend, not a product: inf * 0 would be NaN
        }
      }
    }
  });
}

// z = u > 0 ? u : slope * u, and s[j] = sum over n of z[n, j].
std::vector<at::Tensor> act_forward_sum(const at::Tensor& u, double slope) {
  check(u, u, "the input");
  TORCH_CHECK(u.dim() >= 1 && u.size(0) > 0, "wnorm activation kernel: empty batch");
  auto z = at::empty_like(u);
  auto s = at::zeros(u.sizes().slice(1), u.options());
  const int64_t n_rows = u.size(0), j_len = u.numel() / n_rows;
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "wnorm_act_forward_sum", [&] {
    const auto sl = static_cast<scalar_t>(slope);
    if (slope != 0)
      forward_sum<scalar_t, true>(u.data_ptr<scalar_t>(), z.data_ptr<scalar_t>(),
                                  s.data_ptr<scalar_t>(), n_rows, j_len, sl);
    else
      forward_sum<scalar_t, false>(u.data_ptr<scalar_t>(), z.data_ptr<scalar_t>(),
                                   s.data_ptr<scalar_t>(), n_rows, j_len, sl);
  });
  return {z, s};
}

// g[n, j] = (g[n, j] + c[j]) * (u[n, j] > 0 ? 1 : slope), in place; returns g. For slope >= 0
// the mask may come from the activation's output instead of u (the same signs).
at::Tensor act_backward_add_(at::Tensor g, const at::Tensor& u, const at::Tensor& c,
                             double slope) {
  check(g, u, "the gradient");
  check(u, u, "the input");
  check(c, u, "the correction");
  TORCH_CHECK(g.sizes() == u.sizes() && c.numel() * u.size(0) == u.numel(),
              "wnorm activation kernel: shapes do not match");
  const int64_t n_rows = u.size(0), j_len = u.numel() / n_rows;
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "wnorm_act_backward_add", [&] {
    const auto sl = static_cast<scalar_t>(slope);
    if (slope != 0)
      backward_add<scalar_t, true>(g.data_ptr<scalar_t>(), u.data_ptr<scalar_t>(),
                                   c.data_ptr<scalar_t>(), n_rows, j_len, sl);
    else
      backward_add<scalar_t, false>(g.data_ptr<scalar_t>(), u.data_ptr<scalar_t>(),
                                    c.data_ptr<scalar_t>(), n_rows, j_len, sl);
  });
  return g;
}
