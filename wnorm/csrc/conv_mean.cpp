// The small tensor algebra of mean-only batch norm fused into a convolution
// (wnorm/mean_only_fused.py), one call each way instead of about ten small PyTorch ops.
//
// Forward: from xs, the batch sum of the layer's input (K channels, spatial L1..Ld), the window
// sums S[k, i1..id] = sum over l of xs[k, l] * prod_d R_d[i_d, l_d], with R_d the 0/1 matrix of
// which input positions kernel tap i_d reads along axis d (separable, so one axis at a time);
// then the batch mean of the layer's output, mean[c] = sum_j w[c, j] * S[group(c), j] / count.
// Backward: given the bias gradient gsum, gmean = -gsum / count; the weight-gradient term
// gmean[c] * S[group(c), j] (added in place to the convolution's weight gradient) and the
// batch-constant input-gradient term, the adjoint of the window sums applied to
// sum over c of gmean[c] * w[c, k, j].
//
// Inputs: contiguous CPU float/double tensors of one dtype; the sizes are small (one sample,
// one weight), so plain loops in double, and the 0/1 matrices' zeros are skipped (an input
// position no tap reads, even inf or NaN, does not reach the mean, as in the convolution).

#include <torch/extension.h>

#include <vector>

namespace {

void check(const at::Tensor& t, const at::Tensor& like, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() && t.scalar_type() == like.scalar_type(),
              "wnorm conv-mean kernel: ", what, " must be a contiguous CPU tensor of dtype ",
              like.scalar_type());
}

// out[a, k, b] = sum over l of r[k, l] * x[a, l, b]   (T: the accumulation type, R: r's)
template <typename T, typename R>
void along(const T* x, T* out, const R* r, int64_t A, int64_t L, int64_t K, int64_t B) {
  for (int64_t a = 0; a < A; ++a)
    for (int64_t k = 0; k < K; ++k) {
      T* o = out + (a * K + k) * B;
      for (int64_t b = 0; b < B; ++b) o[b] = T(0);
      for (int64_t l = 0; l < L; ++l) {
        const T rv = static_cast<T>(r[k * L + l]);
        if (rv == T(0)) continue;  // also keeps an inf or NaN the convolution never reads out
        const T* xi = x + (a * L + l) * B;
        for (int64_t b = 0; b < B; ++b) o[b] += rv * xi[b];
      }
    }
}

// the adjoint: out[a, l, b] = sum over k of r[k, l] * x[a, k, b]
template <typename T, typename R>
void spread(const T* x, T* out, const R* r, int64_t A, int64_t K, int64_t L, int64_t B) {
  for (int64_t a = 0; a < A; ++a) {
    T* oa = out + a * L * B;
    for (int64_t i = 0; i < L * B; ++i) oa[i] = T(0);
    for (int64_t k = 0; k < K; ++k) {
      const T* xk = x + (a * K + k) * B;
      for (int64_t l = 0; l < L; ++l) {
        const T rv = static_cast<T>(r[k * L + l]);
        if (rv == T(0)) continue;
        T* o = oa + l * B;
        for (int64_t b = 0; b < B; ++b) o[b] += rv * xk[b];
      }
    }
  }
}

int64_t prod(const std::vector<int64_t>& v, size_t from, size_t to) {
  int64_t p = 1;
  for (size_t i = from; i < to; ++i) p *= v[i];
  return p;
}

// The geometry of one call: tap counts k_d and input sizes L_d per spatial axis.
struct Geometry {
  std::vector<int64_t> k, l;
  int64_t d;
};

// Checks the weight and the tap matrices (CPU, contiguous, the weight's dtype, fitting shapes).
Geometry shapes(const at::Tensor& w, const std::vector<at::Tensor>& taps, int64_t channels,
                int64_t groups) {
  check(w, w, "the weight");
  const int64_t d = static_cast<int64_t>(taps.size());
  TORCH_CHECK(d >= 1 && w.dim() == d + 2 && groups >= 1 && w.size(0) > 0 && w.numel() > 0 &&
                  w.size(0) % groups == 0 && w.size(1) * groups == channels,
              "wnorm conv-mean kernel: the weight ", w.sizes(), " does not fit ", channels,
              " input channels, ", groups, " groups and ", d, " spatial dims");
  Geometry g{std::vector<int64_t>(d), std::vector<int64_t>(d), d};
  for (int64_t i = 0; i < d; ++i) {
    check(taps[i], w, "a tap matrix");
    TORCH_CHECK(taps[i].dim() == 2 && taps[i].size(0) == w.size(i + 2),
                "wnorm conv-mean kernel: tap matrix ", i, " has shape ", taps[i].sizes());
    g.k[i] = taps[i].size(0);
    g.l[i] = taps[i].size(1);
  }
  return g;
}

}  // namespace

// xs: (K, L1..Ld), the batch sum of the input; w: (C, K / groups, k1..kd); taps[d]: (k_d, L_d).
// Returns (mean (C), window sums S (K, k1..kd)).
std::vector<at::Tensor> conv_mean_forward(const at::Tensor& xs, const at::Tensor& w,
                                          const std::vector<at::Tensor>& taps, int64_t groups,
                                          double count) {
  check(xs, w, "the batch sum");
  const Geometry geo = shapes(w, taps, xs.size(0), groups);
  const std::vector<int64_t>&k = geo.k, &l = geo.l;
  const int64_t d = geo.d;
  TORCH_CHECK(xs.dim() == d + 1, "wnorm conv-mean kernel: the batch sum has shape ", xs.sizes());
  for (int64_t i = 0; i < d; ++i)
    TORCH_CHECK(xs.size(i + 1) == l[i], "wnorm conv-mean kernel: the batch sum ", xs.sizes(),
                " does not fit tap matrix ", i, " ", taps[i].sizes());
  const int64_t channels = xs.size(0), out = w.size(0);
  std::vector<int64_t> sum_shape{channels};
  sum_shape.insert(sum_shape.end(), k.begin(), k.end());
  auto sums = at::empty(sum_shape, w.options());
  auto mean = at::empty({out}, w.options());
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "wnorm_conv_mean_forward", [&] {
    // shape along the way: (K, k_1..k_{i-1}, L_i, ..., L_d)
    // in double throughout (a few thousand values), rounded to the dtype once at the end
    std::vector<double> cur(xs.data_ptr<scalar_t>(), xs.data_ptr<scalar_t>() + xs.numel());
    std::vector<double> next;
    for (int64_t i = 0; i < d; ++i) {
      const int64_t A = channels * prod(k, 0, i), B = prod(l, i + 1, d);
      next.resize(A * k[i] * B);
      along(cur.data(), next.data(), taps[i].data_ptr<scalar_t>(), A, l[i], k[i], B);
      cur.swap(next);
    }
    scalar_t* sp = sums.data_ptr<scalar_t>();
    for (size_t i = 0; i < cur.size(); ++i) sp[i] = static_cast<scalar_t>(cur[i]);
    const int64_t per = w.numel() / out, per_group = out / groups;
    const scalar_t* wp = w.data_ptr<scalar_t>();
    scalar_t* mp = mean.data_ptr<scalar_t>();
    for (int64_t c = 0; c < out; ++c) {
      const double* s = cur.data() + (c / per_group) * per;
      const scalar_t* wc = wp + c * per;
      double acc = 0;
      for (int64_t j = 0; j < per; ++j) acc += static_cast<double>(wc[j]) * s[j];
      mp[c] = static_cast<scalar_t>(acc / count);
    }
  });
  return {mean, sums};
}

// The backward of conv_mean_forward's mean (negated: the mean is subtracted) for the bias
// gradient gsum (C). Adds gmean[c] * S[group(c), j] to gw (C, K / groups, k1..kd) in place when
// given; returns the input-gradient term (K, L1..Ld) when need_x, else None.
c10::optional<at::Tensor> conv_mean_backward(const at::Tensor& gsum, const at::Tensor& w,
                                             const at::Tensor& sums,
                                             const std::vector<at::Tensor>& taps, int64_t groups,
                                             double count, c10::optional<at::Tensor> gw,
                                             bool need_x) {
  check(gsum, w, "the bias gradient");
  check(sums, w, "the window sums");
  const Geometry geo = shapes(w, taps, sums.size(0), groups);
  const std::vector<int64_t>&k = geo.k, &l = geo.l;
  const int64_t d = geo.d;
  const int64_t channels = sums.size(0), out = w.size(0);
  const int64_t per = w.numel() / out, per_group = out / groups;
  TORCH_CHECK(gsum.numel() == out && sums.numel() == channels * prod(k, 0, d),
              "wnorm conv-mean kernel: the bias gradient ", gsum.sizes(), " or the window sums ",
              sums.sizes(), " do not fit the weight ", w.sizes());
  if (gw.has_value()) {
    check(*gw, w, "the weight gradient");
    TORCH_CHECK(gw->sizes() == w.sizes(), "wnorm conv-mean kernel: the weight gradient ",
                gw->sizes(), " does not fit the weight ", w.sizes());
  }
  c10::optional<at::Tensor> gxs;
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "wnorm_conv_mean_backward", [&] {
    const scalar_t* wp = w.data_ptr<scalar_t>();
    const scalar_t* sp = sums.data_ptr<scalar_t>();
    const scalar_t* gp = gsum.data_ptr<scalar_t>();
    std::vector<double> gmean(out);  // in double, as in the forward
    for (int64_t c = 0; c < out; ++c) gmean[c] = gp[c] / -count;
    if (gw.has_value()) {
      scalar_t* gwp = gw->data_ptr<scalar_t>();
      for (int64_t c = 0; c < out; ++c) {
        const scalar_t* s = sp + (c / per_group) * per;
        scalar_t* g = gwp + c * per;
        for (int64_t j = 0; j < per; ++j) g[j] += static_cast<scalar_t>(gmean[c] * s[j]);
      }
      torch::autograd::impl::bump_version(*gw);  // written through a pointer
    }
    if (!need_x) return;
    // (K, k1..kd): sum over the group's output channels of gmean[c] * w[c, k, taps]
    std::vector<double> cur(channels * prod(k, 0, d), 0.0), next;
    for (int64_t c = 0; c < out; ++c) {
      double* dst = cur.data() + (c / per_group) * per;
      const scalar_t* wc = wp + c * per;
      for (int64_t j = 0; j < per; ++j) dst[j] += gmean[c] * wc[j];
    }
    // shape along the way: (K, L_1..L_{i-1}, k_i, ..., k_d)
    for (int64_t i = 0; i < d; ++i) {
      const int64_t A = channels * prod(l, 0, i), B = prod(k, i + 1, d);
      next.resize(A * l[i] * B);
      spread(cur.data(), next.data(), taps[i].data_ptr<scalar_t>(), A, k[i], l[i], B);
      cur.swap(next);
    }
    std::vector<int64_t> shape{channels};
    shape.insert(shape.end(), l.begin(), l.end());
    auto t = at::empty(shape, w.options());
    scalar_t* tp = t.data_ptr<scalar_t>();
    for (size_t i = 0; i < cur.size(); ++i) tp[i] = static_cast<scalar_t>(cur[i]);
    gxs = t;
  });
  return gxs;
}
