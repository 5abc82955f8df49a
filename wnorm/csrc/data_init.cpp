// The per-layer step of the paper's data-dependent init (wnorm/data_init.py), for a layer whose
// forward ran with v itself as its weight: from its raw output r = v.x (+ 0), one call computes
// per output unit c
//     ||v_c||, mu[r_c], sigma[r_c] (population), scale_c = s / sigma[r_c],
//     g_c = scale_c ||v_c||  (= s / sigma[t_c], t = r / ||v||),  b_c = -mu[r_c] scale_c,
// and the standardized output (r - mu[r]) scale (r scale where there is no bias to hold the
// mean). It replaces about a dozen small PyTorch ops per layer, whose fixed costs dominate at
// small batch. r is a contiguous CPU tensor viewed as (M, C, S): units on axis 1, M = the values
// before it, S = after it (a Linear's (N, C) is S = 1). v is viewed as (A, C, B) around its unit
// axis. Statistics accumulate in double.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

namespace {

// Sums over the M x S values of each unit; a task takes whole units.
template <typename T>
void unit_sums(const T* rp, int64_t m, int64_t c_len, int64_t s, int64_t c0, int64_t c1,
               const double* mean, double* acc) {
  // acc[c] = sum (r - mean[c])^k over the unit (k = 1 with mean == nullptr, else 2)
  if (s == 1) {  // (M, C): the contiguous axis is the unit axis, vectorize across units
    for (int64_t i = 0; i < m; ++i) {
      const T* row = rp + i * c_len;
      if (mean == nullptr) {
#pragma omp simd
        for (int64_t c = c0; c < c1; ++c) acc[c] += static_cast<double>(row[c]);
      } else {
#pragma omp simd
        for (int64_t c = c0; c < c1; ++c) {
          const double d = static_cast<double>(row[c]) - mean[c];
          acc[c] += d * d;
        }
      }
    }
    return;
  }
  for (int64_t c = c0; c < c1; ++c) {
    double a = 0;
    const double mu = mean == nullptr ? 0.0 : mean[c];
    for (int64_t i = 0; i < m; ++i) {
      const T* p = rp + (i * c_len + c) * s;
      if (mean == nullptr) {
#pragma omp simd reduction(+ : a)
        for (int64_t j = 0; j < s; ++j) a += static_cast<double>(p[j]);
      } else {
#pragma omp simd reduction(+ : a)
        for (int64_t j = 0; j < s; ++j) {
          const double d = static_cast<double>(p[j]) - mu;
          a += d * d;
        }
      }
    }
    acc[c] = a;
  }
}

template <typename T>
void standardize(const T* rp, T* op, int64_t m, int64_t c_len, int64_t s, int64_t c0, int64_t c1,
                 const T* center, const T* scale, const T* add) {
  // out = (r - center[c]) * scale[c] + add[c]: centered first, so a mean far from 0 costs no
  // precision
  if (s == 1) {
    for (int64_t i = 0; i < m; ++i) {
      const T* row = rp + i * c_len;
      T* orow = op + i * c_len;
#pragma omp simd
      for (int64_t c = c0; c < c1; ++c) orow[c] = (row[c] - center[c]) * scale[c] + add[c];
    }
    return;
  }
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t c = c0; c < c1; ++c) {
      const T* p = rp + (i * c_len + c) * s;
      T* o = op + (i * c_len + c) * s;
      const T b = center[c], a = scale[c], d = add[c];
#pragma omp simd
      for (int64_t j = 0; j < s; ++j) o[j] = (p[j] - b) * a + d;
    }
  }
}

// Sum of squares of each unit's slice of v, in T with the vector lanes as partial sums (the
// relative error of such a sum stays near T's epsilon); a float-to-double widening in this loop
// ran at a third of the speed.
template <typename T>
void row_norms(const T* vp, int64_t a_len, int64_t c_len, int64_t b_len, double* out) {
  for (int64_t c = 0; c < c_len; ++c) out[c] = 0;
  for (int64_t a = 0; a < a_len; ++a) {
    for (int64_t c = 0; c < c_len; ++c) {
      const T* p = vp + (a * c_len + c) * b_len;
      T acc = 0;
#pragma omp simd reduction(+ : acc)
      for (int64_t j = 0; j < b_len; ++j) acc += p[j] * p[j];
      out[c] += static_cast<double>(acc);
    }
  }
  for (int64_t c = 0; c < c_len; ++c) out[c] = std::sqrt(out[c]);
}

// Per unit: center = mu[r], scale = s/sigma[r], g = scale ||v||, shift = mu[r] scale, and the
// report's mu[t], sigma[t]; the units whose values are not finite in T (or sigma[r] = 0) go to
// `bad`. Branch-free, so it vectorizes; the bad units are listed only when there are any.
template <typename T>
void unit_params(int64_t c_len, int64_t n, double init_scale, const double* sum, const double* sq,
                 const double* vnorm, T* center, T* scale, T* gval, T* shift, T* mu_t, T* sigma_t,
                 std::vector<int64_t>& bad) {
  constexpr double kMax = std::numeric_limits<double>::max();
  constexpr T kMaxT = std::numeric_limits<T>::max();
  const double inv_n = 1.0 / static_cast<double>(n);
  // |x| <= max is false for inf and NaN. ||v|| must be positive as the dtype computes it (the
  // layer divides by it), and g too: a g that underflows to 0 would silence the unit.
  auto ok = [&](int64_t c, double mu, double sd) {
    return sd > 0 && std::abs(mu) <= kMax && vnorm[c] > 0 && vnorm[c] <= kMax &&
           std::abs(scale[c]) <= kMaxT && gval[c] > 0 && gval[c] <= kMaxT &&
           std::abs(shift[c]) <= kMaxT;
  };
  int64_t n_bad = 0;
#pragma omp simd reduction(+ : n_bad)
  for (int64_t c = 0; c < c_len; ++c) {
    const double mu = sum[c], sd = std::sqrt(sq[c] * inv_n), sc = init_scale / sd;
    center[c] = static_cast<T>(mu);
    scale[c] = static_cast<T>(sc);
    gval[c] = static_cast<T>(sc * vnorm[c]);  // the stored values must be finite too: a
    shift[c] = static_cast<T>(mu * sc);       // float32 g may overflow
    n_bad += ok(c, mu, sd) ? 0 : 1;
    mu_t[c] = static_cast<T>(mu / vnorm[c]);
    sigma_t[c] = static_cast<T>(sd / vnorm[c]);
  }
  for (int64_t c = 0; n_bad > 0 && c < c_len; ++c)
    if (!ok(c, sum[c], std::sqrt(sq[c] * inv_n))) bad.push_back(c);
}

}  // namespace

// r: the raw output, units on `axis`; v: the direction, units on `dim`; g (C values) and bias
// (C values, or undefined) are written in place unless a unit is bad. Returns (out, mu[t],
// sigma[t], the bad units): a unit is bad where sigma[r] is 0 or any of its statistics, g or b
// is not finite. With bad units nothing is written and out is undefined.
// `offset` (C values; only without a bias) is the bias of a mean-only batch norm applied right
// after the layer: out is then that norm's output, (r - mu[r]) scale + offset, as its input's
// batch mean is the layer's scaled mean mu[r] scale.
std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<int64_t>> data_init_layer(
    const at::Tensor& r, int64_t axis, const at::Tensor& v, int64_t dim, at::Tensor g,
    c10::optional<at::Tensor> bias, double init_scale, c10::optional<at::Tensor> offset) {
  const auto dtype = r.scalar_type();
  auto ok = [&](const at::Tensor& t) {
    return t.device().is_cpu() && t.is_contiguous() && t.scalar_type() == dtype;
  };
  TORCH_CHECK(ok(r) && ok(v) && ok(g) && (!bias.has_value() || ok(*bias)) &&
                  (!offset.has_value() || ok(*offset)),
              "wnorm data_init kernel: the output, v, g, bias and offset must be contiguous CPU "
              "tensors of one dtype");
  TORCH_CHECK(!(bias.has_value() && offset.has_value()),
              "wnorm data_init kernel: an offset is for a layer without a bias");
  TORCH_CHECK(axis >= 0 && axis < r.dim() && dim >= 0 && dim < v.dim(),
              "wnorm data_init kernel: unit axis out of range");
  const int64_t c_len = r.size(axis);
  TORCH_CHECK(c_len > 0 && v.size(dim) == c_len && g.numel() == c_len &&
                  (!bias.has_value() || bias->numel() == c_len) &&
                  (!offset.has_value() || offset->numel() == c_len),
              "wnorm data_init kernel: the output has ", c_len,
              " units; v, g, bias or offset disagree");
  int64_t m = 1, s = 1, a_len = 1, b_len = 1;
  for (int64_t d = 0; d < axis; ++d) m *= r.size(d);
  for (int64_t d = axis + 1; d < r.dim(); ++d) s *= r.size(d);
  for (int64_t d = 0; d < dim; ++d) a_len *= v.size(d);
  for (int64_t d = dim + 1; d < v.dim(); ++d) b_len *= v.size(d);
  const int64_t n = m * s;
  TORCH_CHECK(n > 0, "wnorm data_init kernel: empty batch");

  std::vector<double> sum(c_len, 0.0), sq(c_len, 0.0), vnorm(c_len);
  auto mu_t = at::empty({c_len}, r.options()), sigma_t = at::empty({c_len}, r.options());
  at::Tensor out;
  std::vector<int64_t> bad;
  // a task's share: at least ~32k values, whole units
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, n));
  AT_DISPATCH_FLOATING_TYPES(dtype, "wnorm_data_init_layer", [&] {
    const scalar_t* rp = r.data_ptr<scalar_t>();
    row_norms<scalar_t>(v.data_ptr<scalar_t>(), a_len, c_len, b_len, vnorm.data());
    at::parallel_for(0, c_len, grain, [&](int64_t c0, int64_t c1) {
      unit_sums<scalar_t>(rp, m, c_len, s, c0, c1, nullptr, sum.data());
      for (int64_t c = c0; c < c1; ++c) sum[c] /= static_cast<double>(n);  // now the mean
      unit_sums<scalar_t>(rp, m, c_len, s, c0, c1, sum.data(), sq.data());
    });
    std::vector<scalar_t> center(c_len), scale(c_len), gval(c_len), shift(c_len);
    unit_params<scalar_t>(c_len, n, init_scale, sum.data(), sq.data(), vnorm.data(),
                          center.data(), scale.data(), gval.data(), shift.data(),
                          mu_t.data_ptr<scalar_t>(), sigma_t.data_ptr<scalar_t>(), bad);
    if (!bad.empty()) return;
    // written through pointers: bump the version counters, as an in-place op would (wnorm's
    // weight caches are keyed on them)
    std::copy(gval.begin(), gval.end(), g.data_ptr<scalar_t>());
    torch::autograd::impl::bump_version(g);
    if (bias.has_value()) {
      scalar_t* bp = bias->data_ptr<scalar_t>();
      for (int64_t c = 0; c < c_len; ++c) bp[c] = -shift[c];
      torch::autograd::impl::bump_version(*bias);
    }
    std::vector<scalar_t> add(c_len, scalar_t(0));
    if (offset.has_value()) {  // the mean-only norm's output: centered, plus its bias
      const scalar_t* fp = offset->data_ptr<scalar_t>();
      std::copy(fp, fp + c_len, add.begin());
    } else if (!bias.has_value()) {
      std::fill(center.begin(), center.end(), scalar_t(0));  // no bias: the (scaled) mean stays
    }
    out = at::empty_like(r);
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, c_len, grain, [&](int64_t c0, int64_t c1) {
      standardize<scalar_t>(rp, op, m, c_len, s, c0, c1, center.data(), scale.data(), add.data());
    });
  });
  return {out, mu_t, sigma_t, bad};
}
