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
#include <algorithm>
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

// Attention, softmax(q k^T * scale + bias) v, for q (B, H, T, D), k and v (B, KV, S, D) with H a
// multiple of KV (query head h reads kv head h / (H / KV), as Hugging Face's repeat_kv) and bias
// (B, 1, T, S) additive (0 allowed, NEG_INF = -1e9 masked; padding adds another -1e9). MindSpore
// composes it of a batched matmul, a scale, a broadcasting add, a softmax and a second matmul over
// whole (B, H, T, S) score tensors, masked keys included, and keeps the scores and probabilities
// for the backward: ~23 ms forward + backward a SmolLM2 layer in a packed DPO step (8 x 120).
// Here each query reads only the keys from its first allowed one to its last, widened to 16-key
// tiles (a packed row's own segment up to itself; every other key's weight is exp(-1e9 - m) = 0
// exactly in float32, so skipping it changes nothing), writes its output and its softmax's max
// and 1 / sum, and the backward recomputes the weights from those two: nothing of size T x S is
// kept. (Not from a logsumexp: beside a -1e9 bias, m + log(sum) rounds to m.) A query with
// no allowed key reads them all, as the composed softmax does (uniform weights). Scores and
// products accumulate in float in a fixed order, the softmax's sum in double.
//   out = sum_j p_j v_j with p_j = exp(s_j - m) / l, s_j = (q . k_j) * scale + bias_j
//   ds_j = p_j (dout . v_j - dout . out)      dq = scale sum_j ds_j k_j
//   dk_j = scale sum_q ds_j q                  dv_j = sum_q p_j dout
// The work is split over two threads by (row, kv head), each of which owns its keys' gradients;
// within one, the queries (the heads sharing the kv head, position-major) go in groups of four
// through register-tiled products of 16-float vectors (GCC vector extensions: AVX-512 here).
namespace {
typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4)));
inline v16 ld(const float *p) { return *reinterpret_cast<const v16u *>(p); }
inline void st(float *p, v16 x) { *reinterpret_cast<v16u *>(p) = x; }
constexpr int64_t kG = 4;  // queries a group

struct Attn {
  int64_t b, h, kv, t, s, d;
  int64_t dp, s16, rep, nq;  // d and s rounded up to 16, heads a kv head, its queries padded
  float scale;
  const float *q, *k, *v, *bias;
  std::vector<int64_t> lo, hi;  // per (row, position): the 16-aligned keys [lo, hi) read
};

bool attn_shapes(int *ndims, int64_t **shapes, Attn &a) {
  if (ndims[0] != 4 || ndims[1] != 4 || ndims[2] != 4) return false;
  a.b = shapes[0][0], a.h = shapes[0][1], a.t = shapes[0][2], a.d = shapes[0][3];
  a.kv = shapes[1][1], a.s = shapes[1][2];
  if (shapes[1][0] != a.b || shapes[1][3] != a.d || a.kv < 1 || a.h % a.kv != 0) return false;
  if (a.d < 1 || a.d > 128 || a.s < 1) return false;
  for (int i = 0; i < 4; ++i)
    if (shapes[2][i] != shapes[1][i]) return false;
  if (shapes[3][0] != a.b || numel(ndims[3], shapes[3]) != a.b * a.t * a.s) return false;
  a.scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(a.d)));
  a.dp = (a.d + 15) / 16 * 16, a.s16 = (a.s + 15) / 16 * 16;
  a.rep = a.h / a.kv, a.nq = (a.rep * a.t + kG - 1) / kG * kG;
  return true;
}

void attn_ranges(Attn &a) {
  a.lo.assign(a.b * a.t, 0);
  a.hi.assign(a.b * a.t, a.s16);
  for (int64_t r = 0; r < a.b * a.t; ++r) {
    const float *br = a.bias + r * a.s;
    int64_t lo = 0, hi = a.s;
    while (lo < a.s && !(br[lo] > -5e8f)) ++lo;
    while (hi > lo && !(br[hi - 1] > -5e8f)) --hi;
    if (lo < hi) a.lo[r] = lo / 16 * 16, a.hi[r] = (hi + 15) / 16 * 16;
  }
}

// out[g][j] = sum_e x[g][e] * yt[e][j] for g < kG and the 16 CT keys from j0: x rows of stride
// dp, yt (dp, s16), out rows of stride s16
template <int CT>
void tile_scores(const float *x, const float *yt, int64_t dp, int64_t s16, int64_t j0, float *out) {
  v16 acc[kG][CT] = {};
  for (int64_t e = 0; e < dp; ++e) {
    v16 y[CT];
    for (int c = 0; c < CT; ++c) y[c] = ld(yt + e * s16 + j0 + 16 * c);
    for (int64_t g = 0; g < kG; ++g) {
      const float xe = x[g * dp + e];
      for (int c = 0; c < CT; ++c) acc[g][c] += xe * y[c];
    }
  }
  for (int64_t g = 0; g < kG; ++g)
    for (int c = 0; c < CT; ++c) st(out + g * s16 + j0 + 16 * c, acc[g][c]);
}

void scores(const float *x, const float *yt, int64_t dp, int64_t s16, int64_t lo, int64_t hi,
            float *out) {
  for (int64_t j = lo; j < hi; j += 64) {
    const int64_t n = (hi - j < 64 ? hi - j : 64) / 16;
    if (n == 4) tile_scores<4>(x, yt, dp, s16, j, out);
    else if (n == 3) tile_scores<3>(x, yt, dp, s16, j, out);
    else if (n == 2) tile_scores<2>(x, yt, dp, s16, j, out);
    else tile_scores<1>(x, yt, dp, s16, j, out);
  }
}

// out[g] = sum_{j in [lo, hi)} w[g][j] y[j] for g < kG: w rows of stride s16, y and out rows of
// stride 16 ND
template <int ND>
void weighted_rows(const float *w, int64_t s16, const float *y, int64_t lo, int64_t hi,
                   float *out) {
  v16 acc[kG][ND] = {};
  for (int64_t j = lo; j < hi; ++j) {
    v16 yj[ND];
    for (int n = 0; n < ND; ++n) yj[n] = ld(y + j * 16 * ND + 16 * n);
    for (int64_t g = 0; g < kG; ++g) {
      const float wj = w[g * s16 + j];
      for (int n = 0; n < ND; ++n) acc[g][n] += wj * yj[n];
    }
  }
  for (int64_t g = 0; g < kG; ++g)
    for (int n = 0; n < ND; ++n) st(out + g * 16 * ND + 16 * n, acc[g][n]);
}

// out[j] += sum_g w[g][j] x[g] for j in [lo, hi): w rows of stride s16, x and out rows of 16 ND
template <int ND>
void add_weighted(const float *w, int64_t s16, const float *x, int64_t lo, int64_t hi,
                  float *out) {
  v16 xg[kG][ND];
  for (int64_t g = 0; g < kG; ++g)
    for (int n = 0; n < ND; ++n) xg[g][n] = ld(x + g * 16 * ND + 16 * n);
  for (int64_t j = lo; j < hi; ++j) {
    v16 acc[ND];
    for (int n = 0; n < ND; ++n) acc[n] = ld(out + j * 16 * ND + 16 * n);
    for (int64_t g = 0; g < kG; ++g) {
      const float wj = w[g * s16 + j];
      for (int n = 0; n < ND; ++n) acc[n] += wj * xg[g][n];
    }
    for (int n = 0; n < ND; ++n) st(out + j * 16 * ND + 16 * n, acc[n]);
  }
}

template <int ND>
void weighted_rows_nd(const float *w, int64_t s16, const float *y, int64_t lo, int64_t hi,
                      float *out, bool add) {
  if (add) add_weighted<ND>(w, s16, y, lo, hi, out);
  else weighted_rows<ND>(w, s16, y, lo, hi, out);
}

// weighted_rows (add false) or add_weighted (add true) for rows of dp = 16 ND floats
void rows_product(int64_t dp, const float *w, int64_t s16, const float *y, int64_t lo, int64_t hi,
                  float *out, bool add) {
  switch (dp / 16) {
    case 1: return weighted_rows_nd<1>(w, s16, y, lo, hi, out, add);
    case 2: return weighted_rows_nd<2>(w, s16, y, lo, hi, out, add);
    case 3: return weighted_rows_nd<3>(w, s16, y, lo, hi, out, add);
    case 4: return weighted_rows_nd<4>(w, s16, y, lo, hi, out, add);
    case 5: return weighted_rows_nd<5>(w, s16, y, lo, hi, out, add);
    case 6: return weighted_rows_nd<6>(w, s16, y, lo, hi, out, add);
    case 7: return weighted_rows_nd<7>(w, s16, y, lo, hi, out, add);
    default: return weighted_rows_nd<8>(w, s16, y, lo, hi, out, add);
  }
}

// A (row, kv head)'s inputs padded to 16-float rows: keys and values as rows (s16, dp) and
// transposed (dp, s16), and its queries (nq, dp), query j * rep + r being head g * rep + r at
// position j (zero rows past the last)
struct Unit {
  std::vector<float> kr, kt, vr, vt, q, w, w2, tmp;
  std::vector<float> dout, dk, dv;  // the backward's: dout as the queries, the keys' gradients
  Unit(const Attn &a, bool backward)
      : kr(a.s16 * a.dp), kt(a.s16 * a.dp), vr(a.s16 * a.dp), vt(a.s16 * a.dp),
        q(a.nq * a.dp), w(kG * a.s16), w2(kG * a.s16), tmp(a.s16),
        dout(backward ? a.nq * a.dp : 0), dk(backward ? a.s16 * a.dp : 0),
        dv(backward ? a.s16 * a.dp : 0) {}
};

// x (S, D) as rows (s16, dp) and/or transposed (dp, s16), zero-padded; either may be null (the
// forward reads keys transposed and values as rows, the backward keys both ways and values
// transposed)
void load_kv(const Attn &a, const float *x, float *rows, float *cols) {
  if (rows) {
    std::fill(rows, rows + a.s16 * a.dp, 0.0f);
    for (int64_t j = 0; j < a.s; ++j) std::memcpy(rows + j * a.dp, x + j * a.d, sizeof(float) * a.d);
  }
  if (cols) {
    std::fill(cols, cols + a.s16 * a.dp, 0.0f);
    for (int64_t j = 0; j < a.s; ++j)
      for (int64_t e = 0; e < a.d; ++e) cols[e * a.s16 + j] = x[j * a.d + e];
  }
}

// queries of (row b, kv head g) from a (B, H, T, D) tensor (bthd false) or (B, T, H, D) (true)
void load_queries(const Attn &a, const float *x, int64_t b, int64_t g, bool bthd, float *out) {
  std::fill(out, out + a.nq * a.dp, 0.0f);
  for (int64_t i = 0; i < a.t; ++i)
    for (int64_t r = 0; r < a.rep; ++r) {
      const int64_t h = g * a.rep + r;
      const float *src = x + (bthd ? (b * a.t + i) * a.h + h : (b * a.h + h) * a.t + i) * a.d;
      std::memcpy(out + (i * a.rep + r) * a.dp, src, sizeof(float) * a.d);
    }
}

// row b and kv head g's keys, values and queries into u, in the layouts the direction reads;
// returns where its keys start in k, v
int64_t load_unit(const Attn &a, int64_t b, int64_t g, Unit &u, bool backward) {
  const int64_t kvo = (b * a.kv + g) * a.s * a.d;
  load_kv(a, a.k + kvo, backward ? u.kr.data() : nullptr, u.kt.data());
  load_kv(a, a.v + kvo, backward ? nullptr : u.vr.data(), backward ? u.vt.data() : nullptr);
  load_queries(a, a.q, b, g, false, u.q.data());
  return kvo;
}

// query qi of a (row, kv head g) unit: its position i and head h
inline void query_at(const Attn &a, int64_t g, int64_t qi, int64_t &i, int64_t &h) {
  i = qi / a.rep, h = g * a.rep + qi % a.rep;
}

// the keys [lo, hi) a group of queries from qi reads: the union of their positions' ranges
void group_range(const Attn &a, int64_t b, int64_t qi, int64_t &lo, int64_t &hi) {
  lo = a.s16, hi = 0;
  for (int64_t g = 0; g < kG && qi + g < a.rep * a.t; ++g) {
    const int64_t i = (qi + g) / a.rep;
    lo = std::min(lo, a.lo[b * a.t + i]), hi = std::max(hi, a.hi[b * a.t + i]);
  }
}

// the group's scores, scaled and biased, in w over [lo, hi) (keys past s: -inf)
void group_scores(const Attn &a, const Unit &u, int64_t b, int64_t qi, int64_t lo, int64_t hi,
                  float *w) {
  scores(u.q.data() + qi * a.dp, u.kt.data(), a.dp, a.s16, lo, hi, w);
  for (int64_t g = 0; g < kG; ++g) {
    float *wg = w + g * a.s16;
    if (qi + g >= a.rep * a.t) {
      std::fill(wg + lo, wg + hi, 0.0f);
      continue;
    }
    const float *bias = a.bias + (b * a.t + (qi + g) / a.rep) * a.s;
    const int64_t real = std::min(hi, a.s);
    for (int64_t j = lo; j < real; ++j) wg[j] = wg[j] * a.scale + bias[j];
    for (int64_t j = real; j < hi; ++j) wg[j] = -INFINITY;
  }
}

// p[j] = exp(p[j] - shift) for j in [lo, hi), and 0 where p[j] - shift <= -80 (a weight under
// 2e-35 of the largest, 1): glibc's expf takes a slow scalar path for every value that underflows,
// and a masked key's is -1e9. Three plain loops, so that each vectorises (tmp: scratch)
void exp_shifted(float *p, float shift, int64_t lo, int64_t hi, float *tmp) {
  for (int64_t j = lo; j < hi; ++j) tmp[j] = std::max(p[j] - shift, -80.0f);
  for (int64_t j = lo; j < hi; ++j) p[j] = expf(tmp[j]);
  for (int64_t j = lo; j < hi; ++j) p[j] = tmp[j] > -80.0f ? p[j] : 0.0f;
}

// work(row, kv head, scratch) for every pair
template <typename F>
void attn_units(const Attn &a, bool backward, F work) {
  rows_on_two_threads(a.b * a.kv, a.nq * a.s * a.dp, [&](int, int64_t u0, int64_t u1) {
    Unit u(a, backward);
    for (int64_t x = u0; x < u1; ++x) work(x / a.kv, x % a.kv, u);
  });
}

bool attn_inputs(int nparam, int want, void **params, int *ndims, int64_t **shapes,
                 const char **dtypes, Attn &a) {
  if (nparam != want || !all_float32(nparam, dtypes) || !attn_shapes(ndims, shapes, a)) return false;
  a.q = static_cast<const float *>(params[0]);
  a.k = static_cast<const float *>(params[1]);
  a.v = static_cast<const float *>(params[2]);
  a.bias = static_cast<const float *>(params[3]);
  attn_ranges(a);
  return true;
}
}  // namespace

// inputs q (B, H, T, D), k, v (B, KV, S, D), bias (B, 1, T, S); outputs out (B, T, H, D),
// stats (B, H, T, 2): each query's max score m and 1 / l
extern "C" int AttentionForward(int nparam, void **params, int *ndims, int64_t **shapes,
                                const char **dtypes, void *stream, void *extra) {
  Attn a;
  if (!attn_inputs(nparam, 6, params, ndims, shapes, dtypes, a)) return 1;
  float *out = static_cast<float *>(params[4]);
  float *stats = static_cast<float *>(params[5]);
  attn_units(a, false, [&](int64_t b, int64_t g, Unit &u) {
    load_unit(a, b, g, u, false);
    float o[kG * 128];
    for (int64_t qi = 0; qi < a.rep * a.t; qi += kG) {
      int64_t lo, hi;
      group_range(a, b, qi, lo, hi);
      group_scores(a, u, b, qi, lo, hi, u.w.data());
      float stats_g[kG][2];
      for (int64_t x = 0; x < kG && qi + x < a.rep * a.t; ++x) {
        float *p = u.w.data() + x * a.s16;
        const float m = row_max(p + lo, hi - lo);
        exp_shifted(p, m, lo, hi, u.tmp.data());
        const double l = sum8(hi - lo, [&](int64_t j) { return static_cast<double>(p[lo + j]); });
        const float inv = static_cast<float>(1.0 / l);
        for (int64_t j = lo; j < hi; ++j) p[j] *= inv;
        stats_g[x][0] = m, stats_g[x][1] = inv;
      }
      rows_product(a.dp, u.w.data(), a.s16, u.vr.data(), lo, hi, o, false);
      for (int64_t x = 0; x < kG && qi + x < a.rep * a.t; ++x) {
        int64_t i, h;
        query_at(a, g, qi + x, i, h);
        std::memcpy(out + ((b * a.t + i) * a.h + h) * a.d, o + x * a.dp, sizeof(float) * a.d);
        float *st_i = stats + ((b * a.h + h) * a.t + i) * 2;
        st_i[0] = stats_g[x][0], st_i[1] = stats_g[x][1];
      }
    }
  });
  return 0;
}

// inputs q, k, v, bias, out, stats (as AttentionForward's), dout (B, T, H, D); outputs dq
// (B, H, T, D), dk, dv (B, KV, S, D)
extern "C" int AttentionBackward(int nparam, void **params, int *ndims, int64_t **shapes,
                                 const char **dtypes, void *stream, void *extra) {
  Attn a;
  if (!attn_inputs(nparam, 10, params, ndims, shapes, dtypes, a)) return 1;
  const float *out = static_cast<const float *>(params[4]);
  const float *stats = static_cast<const float *>(params[5]);
  const float *dout = static_cast<const float *>(params[6]);
  float *dq = static_cast<float *>(params[7]);
  float *dk = static_cast<float *>(params[8]);
  float *dv = static_cast<float *>(params[9]);
  attn_units(a, true, [&](int64_t b, int64_t g, Unit &u) {
    const int64_t kvo = load_unit(a, b, g, u, true);
    load_queries(a, dout, b, g, true, u.dout.data());
    float *dor = u.dout.data(), *dkr = u.dk.data(), *dvr = u.dv.data();
    std::fill(dkr, dkr + a.s16 * a.dp, 0.0f), std::fill(dvr, dvr + a.s16 * a.dp, 0.0f);
    float *p = u.w.data(), *ds = u.w2.data(), dqg[kG * 128];
    for (int64_t qi = 0; qi < a.rep * a.t; qi += kG) {
      int64_t lo, hi;
      group_range(a, b, qi, lo, hi);
      group_scores(a, u, b, qi, lo, hi, p);
      scores(dor + qi * a.dp, u.vt.data(), a.dp, a.s16, lo, hi, ds);  // dout . v_j
      // past the last query: p is 0 (group_scores) and so is dout . v (zero dout rows)
      for (int64_t x = 0; x < kG && qi + x < a.rep * a.t; ++x) {
        float *px = p + x * a.s16, *dx = ds + x * a.s16;
        int64_t i, h;
        query_at(a, g, qi + x, i, h);
        const float *st_i = stats + ((b * a.h + h) * a.t + i) * 2;
        const float *oi = out + ((b * a.t + i) * a.h + h) * a.d;
        const float di = static_cast<float>(dot(dor + (qi + x) * a.dp, oi, nullptr, a.d));
        exp_shifted(px, st_i[0], lo, hi, u.tmp.data());
        for (int64_t j = lo; j < hi; ++j) px[j] *= st_i[1];
        for (int64_t j = lo; j < hi; ++j) dx[j] = px[j] * (dx[j] - di);
      }
      rows_product(a.dp, ds, a.s16, u.kr.data(), lo, hi, dqg, false);
      rows_product(a.dp, ds, a.s16, u.q.data() + qi * a.dp, lo, hi, dkr, true);
      rows_product(a.dp, p, a.s16, dor + qi * a.dp, lo, hi, dvr, true);
      for (int64_t x = 0; x < kG && qi + x < a.rep * a.t; ++x) {
        int64_t i, h;
        query_at(a, g, qi + x, i, h);
        float *dst = dq + ((b * a.h + h) * a.t + i) * a.d;
        for (int64_t e = 0; e < a.d; ++e) dst[e] = dqg[x * a.dp + e] * a.scale;
      }
    }
    for (int64_t j = 0; j < a.s; ++j)
      for (int64_t e = 0; e < a.d; ++e) {
        dk[kvo + j * a.d + e] = dkr[j * a.dp + e] * a.scale;
        dv[kvo + j * a.d + e] = dvr[j * a.dp + e];
      }
  });
  return 0;
}
