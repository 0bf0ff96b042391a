// Fused CPU kernels of the decoder as MindSpore AOT custom operators (models/fused.py): RMSNorm and
// RoPE, forward and backward. MindSpore 2.9's CPU build has no RmsNorm kernel; composed of
// mul / mean / rsqrt / mul / mul (and RoPE of two broadcasting muls, a permutation matmul and an
// add), each a broadcasting kernel and, eagerly, one dispatch each, they cost a SmolLM2 step ~28%
// (the norms) and ~20% of each attention layer (RoPE).
//
// RMSNorm, over the last axis of x (rows = every other axis), float32 only:
//   rstd = 1 / sqrt(mean(x^2) + eps)          y = x * rstd * w
//   dx = rstd * (dy * w) - x * rstd^3 * mean(dy * w * x)          dw = sum over rows of dy * x * rstd
// Sums accumulate in double; every row is computed the same way whatever the batch around it.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

// glibc's vector expf (libmvec), which the compiler calls in vectorised loops (-fno-math-errno)
#if defined(__GLIBC__) && defined(__x86_64__)
extern "C" float expf(float) throw() __attribute__((__simd__("notinbranch")));
#endif

namespace {
bool all_float32(int n, const char **dtypes) {
  for (int i = 0; i < n; ++i)
    if (std::strcmp(dtypes[i], "float32") != 0 && std::strcmp(dtypes[i], "float") != 0) return false;
  return true;
}
int64_t rows_of(int ndim, const int64_t *shape) {
  int64_t rows = 1;
  for (int i = 0; i < ndim - 1; ++i) rows *= shape[i];
  return rows;
}

// work(side, r0, r1) over rows [0, rows): the first half on a second thread, the rest here, when
// there are at least 2^15 elements (a thread's start costs ~30 us; a decode step's rows stay on
// one). A row is computed the same way on either side.
template <typename F>
void rows_on_two_threads(int64_t rows, int64_t width, F work) {
  if (rows < 2 || rows * width < (int64_t{1} << 15)) {
    work(0, int64_t{0}, rows);
    return;
  }
  const int64_t half = rows / 2;
  std::thread other(work, 1, int64_t{0}, half);
  work(0, half, rows);
  other.join();
}

// sum over j < n of term(j) (a double) in 8 interleaved partial sums added in a fixed order: the
// compiler vectorises it, where one running sum is a chain of n dependent adds (~0.7 ms for a
// 960 x 576 norm). Same order for every row.
template <typename T>
double sum8(int64_t n, T term) {
  double p[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    for (int k = 0; k < 8; ++k) p[k] += term(j + k);
  for (; j < n; ++j) p[j % 8] += term(j);
  return ((p[0] + p[1]) + (p[2] + p[3])) + ((p[4] + p[5]) + (p[6] + p[7]));
}

// sum of a[j] * b[j] * c[j] (c null: of a[j] * b[j]) in double
inline double dot(const float *a, const float *b, const float *c, int64_t n) {
  return sum8(n, [&](int64_t j) { return static_cast<double>(a[j]) * b[j] * (c ? c[j] : 1.0f); });
}

float row_max(const float *x, int64_t n) {
  float p[16];
  for (int k = 0; k < 16; ++k) p[k] = -INFINITY;
  int64_t j = 0;
  for (; j + 16 <= n; j += 16)
    for (int k = 0; k < 16; ++k) p[k] = x[j + k] > p[k] ? x[j + k] : p[k];
  for (; j < n; ++j) p[j % 16] = x[j] > p[j % 16] ? x[j] : p[j % 16];
  float m = p[0];
  for (int k = 1; k < 16; ++k) m = p[k] > m ? p[k] : m;
  return m;
}

// sum of exp(x[j] - m) in double: blocks of exps (vectorised expf), each summed by sum8
double sum_exp(const float *x, float m, int64_t n) {
  float e[256];
  double s = 0.0;
  for (int64_t j = 0; j < n; j += 256) {
    const int64_t c = n - j < 256 ? n - j : 256;
    for (int64_t i = 0; i < c; ++i) e[i] = expf(x[j + i] - m);
    s += sum8(c, [&](int64_t i) { return static_cast<double>(e[i]); });
  }
  return s;
}
}  // namespace

// inputs x (..., d), w (d), eps (1); outputs y (..., d), rstd (..., 1)
extern "C" int RmsNormForward(int nparam, void **params, int *ndims, int64_t **shapes,
                              const char **dtypes, void *stream, void *extra) {
  if (nparam != 5 || !all_float32(nparam, dtypes)) return 1;
  const float *x = static_cast<const float *>(params[0]);
  const float *w = static_cast<const float *>(params[1]);
  const float eps = *static_cast<const float *>(params[2]);
  float *y = static_cast<float *>(params[3]);
  float *rstd = static_cast<float *>(params[4]);
  const int64_t d = shapes[0][ndims[0] - 1], rows = rows_of(ndims[0], shapes[0]);
  if (shapes[1][0] != d) return 2;
  rows_on_two_threads(rows, d, [&](int, int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float *xr = x + r * d;
      float *yr = y + r * d;
      const float s = static_cast<float>(1.0 / std::sqrt(dot(xr, xr, nullptr, d) / d + eps));
      rstd[r] = s;
      for (int64_t j = 0; j < d; ++j) yr[j] = xr[j] * s * w[j];
    }
  });
  return 0;
}

// inputs x (..., d), w (d), rstd (..., 1), dy (..., d); outputs dx (..., d), dw (d)
extern "C" int RmsNormBackward(int nparam, void **params, int *ndims, int64_t **shapes,
                               const char **dtypes, void *stream, void *extra) {
  if (nparam != 6 || !all_float32(nparam, dtypes)) return 1;
  const float *x = static_cast<const float *>(params[0]);
  const float *w = static_cast<const float *>(params[1]);
  const float *rstd = static_cast<const float *>(params[2]);
  const float *dy = static_cast<const float *>(params[3]);
  float *dx = static_cast<float *>(params[4]);
  float *dw = static_cast<float *>(params[5]);
  const int64_t d = shapes[0][ndims[0] - 1], rows = rows_of(ndims[0], shapes[0]);
  // dw: each side sums its rows into its own accumulator, the two added in a fixed order
  std::vector<double> acc[2] = {std::vector<double>(d, 0.0), std::vector<double>(d, 0.0)};
  rows_on_two_threads(rows, d, [&](int side, int64_t r0, int64_t r1) {
    double *a = acc[side].data();
    for (int64_t r = r0; r < r1; ++r) {
      const float *xr = x + r * d, *gr = dy + r * d;
      float *dxr = dx + r * d;
      const float s = rstd[r];
      for (int64_t j = 0; j < d; ++j) a[j] += static_cast<double>(gr[j]) * xr[j] * s;
      const float c = static_cast<float>(dot(gr, w, xr, d) / d) * s * s * s;
      for (int64_t j = 0; j < d; ++j) dxr[j] = gr[j] * w[j] * s - xr[j] * c;
    }
  });
  for (int64_t j = 0; j < d; ++j) dw[j] = static_cast<float>(acc[1][j] + acc[0][j]);
  return 0;
}

// RoPE in the rotate-half layout: x (B, H, T, D), cos and sin (B, 1, T, D), sin carrying
// rotate-half's sign (decoder.Transformer._embed); swap(x)[j] = x[(j + D/2) % D]:
//   y = x * cos + swap(x) * sin          dx = dy * cos + swap(dy * sin)   (swap is its own inverse)
namespace {
int rope(void **params, int *ndims, int64_t **shapes, bool backward) {
  if (ndims[0] != 4 || ndims[1] != 4 || ndims[2] != 4) return 2;
  const int64_t b = shapes[0][0], h = shapes[0][1], t = shapes[0][2], d = shapes[0][3];
  if (d % 2 || shapes[1][0] != b || shapes[1][1] != 1 || shapes[1][2] != t || shapes[1][3] != d)
    return 3;
  const float *x = static_cast<const float *>(params[0]);
  const float *cs = static_cast<const float *>(params[1]);
  const float *sn = static_cast<const float *>(params[2]);
  float *y = static_cast<float *>(params[3]);
  const int64_t half = d / 2;
  for (int64_t bi = 0; bi < b; ++bi)
    for (int64_t hi = 0; hi < h; ++hi)
      for (int64_t ti = 0; ti < t; ++ti) {
        const float *c = cs + (bi * t + ti) * d, *s = sn + (bi * t + ti) * d;
        const float *xr = x + ((bi * h + hi) * t + ti) * d;
        float *yr = y + ((bi * h + hi) * t + ti) * d;
        if (!backward) {
          for (int64_t j = 0; j < half; ++j) yr[j] = xr[j] * c[j] + xr[j + half] * s[j];
          for (int64_t j = half; j < d; ++j) yr[j] = xr[j] * c[j] + xr[j - half] * s[j];
        } else {  // x is dy here
          for (int64_t j = 0; j < half; ++j) yr[j] = xr[j] * c[j] + xr[j + half] * s[j + half];
          for (int64_t j = half; j < d; ++j) yr[j] = xr[j] * c[j] + xr[j - half] * s[j - half];
        }
      }
  return 0;
}
}  // namespace

// inputs x, cos, sin; output y
extern "C" int RopeForward(int nparam, void **params, int *ndims, int64_t **shapes,
                           const char **dtypes, void *stream, void *extra) {
  if (nparam != 4 || !all_float32(nparam, dtypes)) return 1;
  return rope(params, ndims, shapes, false);
}

// inputs dy, cos, sin; output dx
extern "C" int RopeBackward(int nparam, void **params, int *ndims, int64_t **shapes,
                            const char **dtypes, void *stream, void *extra) {
  if (nparam != 4 || !all_float32(nparam, dtypes)) return 1;
  return rope(params, ndims, shapes, true);
}

// Swap axes 1 and 2 of a 4-D tensor: x (A, B, C, D) -> y (A, C, B, D), rows of D copied whole.
// Attention moves q, k, v between (batch, T, heads, D) and (batch, heads, T, D) and back: MindSpore
// 2.9's CPU Transpose does it at ~0.35 GB/s (5 ms for one 32 x 24 x 9 x 64 query). Its own inverse,
// so the backward is the same kernel on the gradient. Any 4-byte dtype.
extern "C" int SwapAxes12(int nparam, void **params, int *ndims, int64_t **shapes,
                          const char **dtypes, void *stream, void *extra) {
  if (nparam != 2 || !all_float32(nparam, dtypes)) return 1;
  if (ndims[0] != 4) return 2;
  const int64_t a = shapes[0][0], b = shapes[0][1], c = shapes[0][2], d = shapes[0][3];
  const float *x = static_cast<const float *>(params[0]);
  float *y = static_cast<float *>(params[1]);
  for (int64_t ai = 0; ai < a; ++ai)
    for (int64_t bi = 0; bi < b; ++bi)
      for (int64_t ci = 0; ci < c; ++ci)
        std::memcpy(y + ((ai * c + ci) * b + bi) * d, x + ((ai * b + bi) * c + ci) * d,
                    sizeof(float) * d);
  return 0;
}

// SwiGLU's gate, h = silu(g) * u = g * u * sigmoid(g), on g, u (rows, f) alike. MindSpore composes
// it of a sigmoid and two multiplies forward and about a dozen elementwise kernels backward, and
// keeps the intermediates (rows, f) each for the backward; here one pass each way, and only g and
// u kept (with the fused head below, DPO at SmolLM2's shape peaks at 4.37 GB against 4.70).
// With s = sigmoid(g): du = dh * g * s, dg = dh * u * s * (1 + g * (1 - s)). expf: glibc's vector
// variant (top).
namespace {
int swiglu(void **params, int *ndims, int64_t **shapes, bool backward) {
  for (int j = 0; j < ndims[0]; ++j)
    if (ndims[1] != ndims[0] || shapes[1][j] != shapes[0][j]) return 2;
  const int64_t f = shapes[0][ndims[0] - 1], rows = rows_of(ndims[0], shapes[0]);
  const float *g = static_cast<const float *>(params[0]);
  const float *u = static_cast<const float *>(params[1]);
  const float *dh = backward ? static_cast<const float *>(params[2]) : nullptr;
  float *out = static_cast<float *>(params[backward ? 3 : 2]);  // h, or dg
  float *du = backward ? static_cast<float *>(params[4]) : nullptr;
  rows_on_two_threads(rows, f, [&](int, int64_t r0, int64_t r1) {
    const int64_t a = r0 * f, b = r1 * f;
    if (!backward) {
      for (int64_t i = a; i < b; ++i) out[i] = g[i] * u[i] / (1.0f + expf(-g[i]));
      return;
    }
    for (int64_t i = a; i < b; ++i) {
      const float s = 1.0f / (1.0f + expf(-g[i]));
      du[i] = dh[i] * g[i] * s;
      out[i] = dh[i] * u[i] * s * (1.0f + g[i] * (1.0f - s));
    }
  });
  return 0;
}
}  // namespace

// inputs g, u; output h
extern "C" int SwigluForward(int nparam, void **params, int *ndims, int64_t **shapes,
                             const char **dtypes, void *stream, void *extra) {
  if (nparam != 3 || !all_float32(nparam, dtypes)) return 1;
  return swiglu(params, ndims, shapes, false);
}

// inputs g, u, dh; outputs dg, du
extern "C" int SwigluBackward(int nparam, void **params, int *ndims, int64_t **shapes,
                              const char **dtypes, void *stream, void *extra) {
  if (nparam != 5 || !all_float32(nparam, dtypes)) return 1;
  return swiglu(params, ndims, shapes, true);
}

// ---- the eager optimizer step (mindrlhf/optim.py FusedUpdate) ----------------------------------
// MindSpore's AdamWeightDecay CPU kernel updates SmolLM2-135M's 134.5M parameters in ~0.52 s, and
// the eager Trainer reads the gradient norm on the host in float64 (~0.15 s) and clips with one
// multiply per gradient (~0.06 s): ~0.7 s of a 6 s DPO step. The same work is one pass over
// memory (read p, m, v, g; write p, m, v: 3.8 GB at ~27 GB/s here), split across two threads.

// The eager Trainer's optimizer step and gradient norm (optim.FusedUpdate): every parameter in
// one call, as one kernel call per tensor cost ~0.5 ms of dispatch each (272 tensors at SmolLM2:
// ~0.3 s a step, as much as the work). Each of two threads takes its half of every tensor.
namespace {
template <typename F>
void halves_on_two_threads(int k, const int64_t *sizes, F work) {
  auto part = [&](int side) {
    for (int j = 0; j < k; ++j) {
      const int64_t n = sizes[j], half = n / 2;
      if (side == 0) work(0, j, 0, half);
      else work(1, j, half, n);
    }
  };
  std::thread other(part, 1);
  part(0);
  other.join();
}

int64_t numel(int nd, const int64_t *shape) {
  int64_t n = 1;
  for (int i = 0; i < nd; ++i) n *= shape[i];
  return n;
}
}  // namespace

// inputs g_0 .. g_{K-1} (float32, any shapes); output s (1,) float64: the sum of every g^2
extern "C" int SumSquaresMany(int nparam, void **params, int *ndims, int64_t **shapes,
                              const char **dtypes, void *stream, void *extra) {
  const int k = nparam - 1;
  if (k < 1 || !all_float32(k, dtypes)) return 1;
  std::vector<int64_t> sizes(k);
  for (int j = 0; j < k; ++j) sizes[j] = numel(ndims[j], shapes[j]);
  double part[2] = {0.0, 0.0};
  halves_on_two_threads(k, sizes.data(), [&](int side, int j, int64_t a, int64_t b) {
    const float *g = static_cast<const float *>(params[j]) + a;
    part[side] += dot(g, g, nullptr, b - a);  // each thread its own slot
  });
  static_cast<double *>(params[k])[0] = part[0] + part[1];
  return 0;
}

// AdamWeightDecay's update, in place on p, m, v (the Parameters' own memory):
//   g' = g * scale                    (scale: global-norm clipping's factor, 1 when not clipping)
//   m += (g' - m) * (1 - beta1)       v += (g'^2 - v) * (1 - beta2)
//   p -= lr * (m / (sqrt(v) + eps) + wd * p)
// inputs h (6: lr, beta1, beta2, eps, wd, scale), then p, m, v, g (n each) of each of K
// parameters; output done (1,)
extern "C" int AdamWeightDecayInPlaceMany(int nparam, void **params, int *ndims, int64_t **shapes,
                                          const char **dtypes, void *stream, void *extra) {
  if (nparam < 6 || (nparam - 2) % 4 != 0 || !all_float32(nparam, dtypes)) return 1;
  const int k = (nparam - 2) / 4;
  std::vector<int64_t> sizes(k);
  for (int j = 0; j < k; ++j) {
    sizes[j] = numel(ndims[1 + 4 * j], shapes[1 + 4 * j]);
    for (int t = 1; t < 4; ++t)
      if (numel(ndims[1 + 4 * j + t], shapes[1 + 4 * j + t]) != sizes[j]) return 2;
  }
  const float *h = static_cast<const float *>(params[0]);
  const float lr = h[0], one_b1 = 1.0f - h[1], one_b2 = 1.0f - h[2], eps = h[3], wd = h[4],
              scale = h[5];
  halves_on_two_threads(k, sizes.data(), [&](int, int j, int64_t a, int64_t b) {
    float *p = static_cast<float *>(params[1 + 4 * j]);
    float *m = static_cast<float *>(params[2 + 4 * j]);
    float *v = static_cast<float *>(params[3 + 4 * j]);
    const float *g = static_cast<const float *>(params[4 + 4 * j]);
    for (int64_t i = a; i < b; ++i) {
      const float gi = g[i] * scale;
      const float mi = m[i] + (gi - m[i]) * one_b1;
      const float vi = v[i] + (gi * gi - v[i]) * one_b2;
      m[i] = mi;
      v[i] = vi;
      p[i] -= lr * (mi / (std::sqrt(vi) + eps) + wd * p[i]);
    }
  });
  static_cast<float *>(params[nparam - 1])[0] = 1.0f;
  return 0;
}

// Log-probabilities of given tokens from logits (the DPO family's loss head, models/head.py):
// lp[r] = x[r, label[r]] - logsumexp(x[r]), with logsumexp(x) = m + log(sum
// exp(x - m)), m the row's max, as MindSpore's LogSoftmax computes it. MindSpore writes the whole
// (rows, V) log-softmax (157 MB at 800 x 49,152) and gathers from it; backward, a dense scatter of
// the gathered gradient and LogSoftmaxGrad over both. Here the forward reads the logits twice and
// writes two numbers a row; the backward, dx[r, j] = dlp[r] * ([j == label[r]] - exp(x[r, j] -
// lse[r])), reads them once and writes dx.
namespace {
// x (float32), labels (int32), then n more float32
bool token_logprob_types(const char **dtypes, int n) {
  return all_float32(1, dtypes) && std::strcmp(dtypes[1], "int32") == 0 &&
         all_float32(n, dtypes + 2);
}
}  // namespace

// inputs x (..., V), labels (...) int32; outputs lp (...), lse (...)
extern "C" int TokenLogprobForward(int nparam, void **params, int *ndims, int64_t **shapes,
                                   const char **dtypes, void *stream, void *extra) {
  if (nparam != 4 || !token_logprob_types(dtypes, 2)) return 1;
  const int64_t v = shapes[0][ndims[0] - 1], rows = rows_of(ndims[0], shapes[0]);
  if (numel(ndims[1], shapes[1]) != rows) return 2;
  const float *x = static_cast<const float *>(params[0]);
  const int32_t *label = static_cast<const int32_t *>(params[1]);
  float *lp = static_cast<float *>(params[2]);
  float *lse = static_cast<float *>(params[3]);
  bool bad[2] = {false, false};
  rows_on_two_threads(rows, v, [&](int side, int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float *xr = x + r * v;
      const float m = row_max(xr, v);
      const float ls = static_cast<float>(std::log(sum_exp(xr, m, v)));
      const int32_t l = label[r];
      if (l < 0 || l >= v) {
        bad[side] = true;
        continue;
      }
      lse[r] = m + ls;
      lp[r] = (xr[l] - m) - ls;
    }
  });
  return bad[0] || bad[1] ? 3 : 0;
}

// inputs x (..., V), labels (...) int32, lse (...), dlp (...); output dx (..., V)
extern "C" int TokenLogprobBackward(int nparam, void **params, int *ndims, int64_t **shapes,
                                    const char **dtypes, void *stream, void *extra) {
  if (nparam != 5 || !token_logprob_types(dtypes, 3)) return 1;
  const int64_t v = shapes[0][ndims[0] - 1], rows = rows_of(ndims[0], shapes[0]);
  const float *x = static_cast<const float *>(params[0]);
  const int32_t *label = static_cast<const int32_t *>(params[1]);
  const float *lse = static_cast<const float *>(params[2]);
  const float *dlp = static_cast<const float *>(params[3]);
  float *dx = static_cast<float *>(params[4]);
  rows_on_two_threads(rows, v, [&](int, int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float *xr = x + r * v;
      float *dr = dx + r * v;
      const float g = dlp[r], c = lse[r];
      for (int64_t j = 0; j < v; ++j) dr[j] = -g * expf(xr[j] - c);
      const int32_t l = label[r];
      if (l >= 0 && l < v) dr[l] += g;
    }
  });
  return 0;
}
