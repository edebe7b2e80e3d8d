// The stateful agent cell (mplp/agents.py, module docstring) as one CPU kernel per tile
// of agents: forward, and backward with the forward recomputed, every intermediate of a
// tile of T agents kept in cache instead of streamed through memory by one XLA kernel per
// op. Built and loaded by mplp/cell_kernel.py (g++ -O3 -march=native).
//
// Shapes (float32, row-major):
//   x      [G, n, X]   the agents' input (the concatenated parts), G groups of n agents
//   c      [G, n, C]   the carry
//   params [Gp, P]     Gp = 1 (shared by every group) or G; per group, in this order:
//                      wgx [X, 2C] (z columns, then r), wgc [C, 2C], bg [2C],
//                      wx0 [X, H1], bx0 [H1], wx1 [H1, H2], bx1 [H2], wx2 [H2, C],
//                      wc0 [C, H1], bc0 [H1], wc1 [H1, H2], bc1 [H2], wc2 [H2, C], b [C]
//   forward:  -> new [G, n, C]
//   backward: (x, c, params, d_new [G, n, C]) -> d_x [G, n, X], d_c [G, n, C],
//             d_params [G, P] (each group's parameter cotangent, summed over its agents)
//
// The equations: g = x wgx + c wgc + bg; z = sigmoid(g[:C]); r = sigmoid(g[C:]);
// hx0 = tanh(x wx0 + bx0); hx1 = tanh(hx0 wx1 + bx1); hc0 = tanh((r c) wc0 + bc0);
// hc1 = tanh(hc0 wc1 + bc1); cand = tanh(hx1 wx2 + hc1 wc2 + b); new = z c + (1 - z) cand.
//
// Layout: inside a tile every tensor is channel-major, [channels, T] ("structure of
// arrays"): a vector register holds one channel of VW agents, so no channel count is
// padded to the vector width, and every product is out[j] += w[k, j] * in[k] with the
// weight broadcast. Parameter cotangents are sums over agents. Those of the weights are
// summed over the tile in registers, vectorized over the product's wider side (a hidden
// layer's, or the gates' 2C), from agent-major copies of the tile's activations or their
// cotangents (outer_t); the biases' are kept per vector lane ([P, VW]). Each chunk of
// tiles reduces its sums once per group it covers, into its own row; the rows are added
// in chunk order.

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#include <immintrin.h>
#include <sched.h>
#include <unistd.h>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

#if defined(__AVX512F__)
constexpr int VW = 16;  // floats per vector register (32 registers)
constexpr int JB = 6;   // output channels a product keeps in registers (x 4 vectors of agents)
constexpr int TKB = 4, TVB = 5;  // rows x vectors of a register-summed cotangent block
#else
constexpr int VW = 8;   // (16 registers)
constexpr int JB = 2;
constexpr int TKB = 2, TVB = 5;
#endif
constexpr int T = 64;        // agents per tile
constexpr int A = T / VW;    // vectors of agents per channel
constexpr int AB = 4;        // vectors of agents a product keeps in registers
typedef float vf __attribute__((vector_size(VW * 4)));

#if defined(__AVX512F__)
inline vf splat(float a) { return (vf)_mm512_set1_ps(a); }
#elif defined(__AVX__)
inline vf splat(float a) { return (vf)_mm256_set1_ps(a); }
#else
inline vf splat(float a) { return vf{} + a; }
#endif
inline vf load(const float* p) { vf v; std::memcpy(&v, p, sizeof v); return v; }
inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }

// 1 / q: the hardware's estimate and one Newton step (about 23 bits; a division is
// several times slower and tanh is most of the cell's work besides the products).
inline vf recip(vf q) {
#if defined(__AVX512F__)
  vf e = (vf)_mm512_rcp14_ps((__m512)q);
#elif defined(__AVX__)
  vf e = (vf)_mm256_rcp_ps((__m256)q);
#else
  vf e = 1.0f / q;
#endif
  return e * (2.0f - q * e);
}

// min(a, x), max(a, x) that pass a NaN x through (x > a ? a : x), in one instruction.
inline vf min_v(vf a, vf x) {
#if defined(__AVX512F__)
  return (vf)_mm512_min_ps((__m512)a, (__m512)x);
#elif defined(__AVX__)
  return (vf)_mm256_min_ps((__m256)a, (__m256)x);
#else
  return x > a ? a : x;
#endif
}
inline vf max_v(vf a, vf x) {
#if defined(__AVX512F__)
  return (vf)_mm512_max_ps((__m512)a, (__m512)x);
#elif defined(__AVX__)
  return (vf)_mm256_max_ps((__m256)a, (__m256)x);
#else
  return x < a ? a : x;
#endif
}
inline vf abs_v(vf x) {
  typedef int vi __attribute__((vector_size(VW * 4)));
  return (vf)((vi)x & 0x7fffffff);
}

// tanh as XLA's CPU backend computes it (Eigen's rational approximation, clamped).
inline vf tanh_v(vf x) {
  const vf lim = splat(7.90531110763549805f);
  const vf xc = max_v(-lim, min_v(lim, x));
  const vf x2 = xc * xc;
  vf p = splat(-2.76076847742355e-16f);
  p = p * x2 + 2.00018790482477e-13f;
  p = p * x2 + -8.60467152213735e-11f;
  p = p * x2 + 5.12229709037114e-08f;
  p = p * x2 + 1.48572235717979e-05f;
  p = p * x2 + 6.37261928875436e-04f;
  p = p * x2 + 4.89352455891786e-03f;
  p = p * xc;
  vf q = splat(1.19825839466702e-06f);
  q = q * x2 + 1.18534705686654e-04f;
  q = q * x2 + 2.26843463243900e-03f;
  q = q * x2 + 4.89352518554385e-03f;
  const vf t = p * recip(q);
  return abs_v(x) < 0.0004f ? x : t;
}
inline vf sigmoid_v(vf x) { return 0.5f * tanh_v(0.5f * x) + 0.5f; }

// What a product does to its result in registers before the store: nothing, tanh, or
// (a tanh's backward) a multiplication by 1 - h^2 for the tanh's output h.
enum Epilogue { kNone, kTanh, kTimesDtanh };

inline vf one_minus_sq(vf h) { return 1.0f - h * h; }

// out[j0 + jb] (+)= bias + sum_k w[k, j0 + jb] * in[k] for jb < J, on NB vectors of agents
// starting at vector a0, then the epilogue E (h: [channels, T] like out). in, out:
// [channels, T]; w: [K, ldw].
template <int J, Epilogue E, int NB>
inline void dense_block(const float* in, int K, const float* w, int ldw, int j0, int a0,
                        const float* bias, bool accumulate, float* out, const float* h) {
  vf acc[J][NB];
  for (int j = 0; j < J; ++j)
    for (int a = 0; a < NB; ++a)
      acc[j][a] = accumulate ? load(out + (j0 + j) * T + (a0 + a) * VW) : splat(bias ? bias[j0 + j] : 0.0f);
  for (int k = 0; k < K; ++k) {
    vf v[NB];
    for (int a = 0; a < NB; ++a) v[a] = load(in + k * T + (a0 + a) * VW);
    for (int j = 0; j < J; ++j) {
      const vf s = splat(w[k * ldw + j0 + j]);
      for (int a = 0; a < NB; ++a) acc[j][a] += s * v[a];
    }
  }
  for (int j = 0; j < J; ++j)
    for (int a = 0; a < NB; ++a) {
      const int at = (j0 + j) * T + (a0 + a) * VW;
      vf v = acc[j][a];
      if (E == kTanh) v = tanh_v(v);
      if (E == kTimesDtanh) v = v * one_minus_sq(load(h + at));
      store(out + at, v);
    }
}

// All J output channels on NB vectors of agents from vector a0.
template <Epilogue E, int NB>
inline void dense_columns(const float* in, int K, const float* w, int ldw, int J, int a0,
                          const float* bias, bool accumulate, float* out, const float* h) {
  int j0 = 0;
  for (; j0 + JB <= J; j0 += JB) dense_block<JB, E, NB>(in, K, w, ldw, j0, a0, bias, accumulate, out, h);
  for (; j0 + 2 <= J; j0 += 2) dense_block<2, E, NB>(in, K, w, ldw, j0, a0, bias, accumulate, out, h);
  for (; j0 < J; ++j0) dense_block<1, E, NB>(in, K, w, ldw, j0, a0, bias, accumulate, out, h);
}

// A tile's product: out [J, T] (+)= bias [J] + w[K, J]^T-contracted in [K, T], i.e.
// out[j, t] = bias[j] + sum_k w[k, j] in[k, t]  (w row-major with row stride ldw), then
// the epilogue E in registers before the store (h: kTimesDtanh's tanh outputs [J, T]);
// on the tile's first nv vectors of agents (the rest hold no agent).
template <Epilogue E = kNone>
inline void dense(int nv, const float* in, int K, const float* w, int ldw, int J, const float* bias,
                  bool accumulate, float* out, const float* h = nullptr) {
  int a0 = 0;
  for (; a0 + AB <= nv; a0 += AB) dense_columns<E, AB>(in, K, w, ldw, J, a0, bias, accumulate, out, h);
  for (; a0 < nv; ++a0) dense_columns<E, 1>(in, K, w, ldw, J, a0, bias, accumulate, out, h);
}

// v transposed in registers: v[i][j] <- v[j][i] (VW x VW).
inline void transpose_block(vf (&v)[VW]) {
#if defined(__AVX512F__)
  // 32-bit, then 64-bit interleaves: u[4g + m]'s 128-bit lane L holds column 4L + m of
  // rows 4g .. 4g + 3; then the lanes are gathered (shuffle_f32x4) into whole columns.
  __m512 t[16], u[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps((__m512)v[i], (__m512)v[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps((__m512)v[i], (__m512)v[i + 1]);
  }
  for (int g = 0; g < 16; g += 4) {
    const __m512d a = _mm512_castps_pd(t[g]), b = _mm512_castps_pd(t[g + 1]);
    const __m512d c = _mm512_castps_pd(t[g + 2]), d = _mm512_castps_pd(t[g + 3]);
    u[g] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    u[g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    u[g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    u[g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
  for (int m = 0; m < 4; ++m) {
    const __m512 lo01 = _mm512_shuffle_f32x4(u[m], u[4 + m], 0x44), hi01 = _mm512_shuffle_f32x4(u[m], u[4 + m], 0xEE);
    const __m512 lo23 = _mm512_shuffle_f32x4(u[8 + m], u[12 + m], 0x44), hi23 = _mm512_shuffle_f32x4(u[8 + m], u[12 + m], 0xEE);
    v[m] = (vf)_mm512_shuffle_f32x4(lo01, lo23, 0x88);
    v[4 + m] = (vf)_mm512_shuffle_f32x4(lo01, lo23, 0xDD);
    v[8 + m] = (vf)_mm512_shuffle_f32x4(hi01, hi23, 0x88);
    v[12 + m] = (vf)_mm512_shuffle_f32x4(hi01, hi23, 0xDD);
  }
#elif defined(__AVX__)
  __m256 t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps((__m256)v[i], (__m256)v[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps((__m256)v[i], (__m256)v[i + 1]);
  }
  for (int g = 0; g < 8; g += 4) {
    u[g] = _mm256_shuffle_ps(t[g], t[g + 2], 0x44);
    u[g + 1] = _mm256_shuffle_ps(t[g], t[g + 2], 0xEE);
    u[g + 2] = _mm256_shuffle_ps(t[g + 1], t[g + 3], 0x44);
    u[g + 3] = _mm256_shuffle_ps(t[g + 1], t[g + 3], 0xEE);
  }
  for (int m = 0; m < 4; ++m) {
    v[m] = (vf)_mm256_permute2f128_ps(u[m], u[4 + m], 0x20);
    v[4 + m] = (vf)_mm256_permute2f128_ps(u[m], u[4 + m], 0x31);
  }
#else
  float a[VW][VW];
  for (int i = 0; i < VW; ++i) store(a[i], v[i]);
  for (int i = 0; i < VW; ++i)
    for (int j = 0; j < VW; ++j) v[i][j] = a[j][i];
#endif
}

// dst [T, ldd] (agent-major) <- src [R, T] (channel-major), in VW x VW blocks, for the
// first nv vectors of agents; rows of a last partial block read as zeros, so dst's
// columns up to ldd = R rounded up to VW are all written.
inline void transpose_tile(int nv, const float* src, int R, float* dst, int ldd) {
  for (int r0 = 0; r0 < R; r0 += VW)
    for (int t0 = 0; t0 < nv * VW; t0 += VW) {
      vf v[VW];
      for (int i = 0; i < VW; ++i) v[i] = r0 + i < R ? load(src + (r0 + i) * T + t0) : splat(0.0f);
      transpose_block(v);
      for (int i = 0; i < VW; ++i) store(dst + (t0 + i) * ldd + r0, v[i]);
    }
}

// A product's weight cotangent summed over the tile in registers: acc[k, :] += sum_t
// b[k, t] v[t, :] over the tile's first nt agents, b [K, T] channel-major (broadcast),
// v [T, ldv] agent-major (ldv a multiple of VW). acc [K, ldv] is the chunk's sum (no
// per-lane copies).
template <int KB, int VB>
inline void outer_t_block(int nt, const float* b, int k0, const float* v, int ldv, int v0, float* acc) {
  vf a[KB][VB];
  for (int k = 0; k < KB; ++k)
    for (int j = 0; j < VB; ++j) a[k][j] = splat(0.0f);
  for (int t = 0; t < nt; ++t) {
    vf u[VB];
    for (int j = 0; j < VB; ++j) u[j] = load(v + t * ldv + v0 + j * VW);
    for (int k = 0; k < KB; ++k) {
      const vf s = splat(b[(k0 + k) * T + t]);
      for (int j = 0; j < VB; ++j) a[k][j] += s * u[j];
    }
  }
  for (int k = 0; k < KB; ++k)
    for (int j = 0; j < VB; ++j) {
      float* o = acc + (k0 + k) * ldv + v0 + j * VW;
      store(o, load(o) + a[k][j]);
    }
}

template <int KB>
inline void outer_t_rows(int nt, const float* b, int k0, const float* v, int ldv, float* acc) {
  const int vectors = ldv / VW;
  int j = 0;
  for (; j + TVB <= vectors; j += TVB) outer_t_block<KB, TVB>(nt, b, k0, v, ldv, j * VW, acc);
  for (; j < vectors; ++j) outer_t_block<KB, 1>(nt, b, k0, v, ldv, j * VW, acc);
}

inline void outer_t(int nv, const float* b, int K, const float* v, int ldv, float* acc) {
  int k = 0;
  for (; k + TKB <= K; k += TKB) outer_t_rows<TKB>(nv * VW, b, k, v, ldv, acc);
  for (; k < K; ++k) outer_t_rows<1>(nv * VW, b, k, v, ldv, acc);
}

// Per-lane cotangent of a bias: db[j] += d[j] over the tile's first nv vectors of agents.
// d [J, T], db [J, VW].
inline void lane_sum(int nv, const float* d, int J, float* db) {
  for (int j = 0; j < J; ++j) {
    vf s = load(db + j * VW);
    for (int a = 0; a < nv; ++a) s += load(d + j * T + a * VW);
    store(db + j * VW, s);
  }
}

// f(i) for the offset i of each vector of the first nv vectors of agents of each of the
// channels of a [channels, T] buffer (elementwise work).
template <typename F>
inline void each(int nv, int channels, F f) {
  for (int ch = 0; ch < channels; ++ch)
    for (int a = 0; a < nv; ++a) f(ch * T + a * VW);
}

// Where each parameter lives in the caller's flat vector (and, times VW, in a chunk's
// per-lane cotangent), and in the packed copy (the transposes the backward pass uses).
struct Layout {
  int X, C, H1, H2, KXC, H1p, H2p2, C2p;  // H1p, H2p2, C2p: H1, 2 H2 and 2 C rounded up to VW
  int o_wg, o_bg, o_wx0, o_bx0, o_wx1, o_bx1, o_wx2, o_wc0, o_bc0, o_wc1, o_bc1, o_wc2, o_b, P;
  int q_w2, q_wgT, q_wx0T, q_wx1T, q_w2T, q_wc0T, q_wc1T, Q;
  // A chunk's register-summed cotangents (outer_t), vectorized over the wider side:
  // [wx2; wc2]^T [C, H2p2], wx1^T and wc1^T [H2, H1p], wx0 [X, H1p], wc0 [C, H1p],
  // wg [X + C, C2p].
  int s_w2T, s_wx1T, s_wc1T, s_wx0, s_wc0, s_wg, S;
  // The parameters summed per vector lane instead (the biases): ranges [at, at + n) of the
  // flat vector; only these lanes are ever written.
  int lane_at[6], lane_n[6];
  Layout(int x, int c, int h1, int h2)
      : X(x), C(c), H1(h1), H2(h2), KXC(x + c), H1p((h1 + VW - 1) / VW * VW),
        H2p2((2 * h2 + VW - 1) / VW * VW), C2p((2 * c + VW - 1) / VW * VW) {
    int o = 0;
    auto take = [&o](int k) { int at = o; o += k; return at; };
    o_wg = take(KXC * 2 * C); o_bg = take(2 * C);  // wgx then wgc: one [X + C, 2C] kernel
    o_wx0 = take(X * H1); o_bx0 = take(H1); o_wx1 = take(H1 * H2); o_bx1 = take(H2);
    o_wx2 = take(H2 * C); o_wc0 = take(C * H1); o_bc0 = take(H1); o_wc1 = take(H1 * H2);
    o_bc1 = take(H2); o_wc2 = take(H2 * C); o_b = take(C); P = o;
    o = 0;
    q_w2 = take(2 * H2 * C);  // [wx2; wc2]: [2 H2, C]
    q_wgT = take(2 * C * KXC); q_wx0T = take(H1 * X); q_wx1T = take(H2 * H1);
    q_w2T = take(C * 2 * H2); q_wc0T = take(H1 * C); q_wc1T = take(H2 * H1);
    Q = o;
    o = 0;
    s_w2T = take(C * H2p2); s_wx1T = take(H2 * H1p); s_wc1T = take(H2 * H1p);
    s_wx0 = take(X * H1p); s_wc0 = take(C * H1p); s_wg = take(KXC * C2p); S = o;
    const int ranges[6][2] = {{o_bg, 2 * C}, {o_bx0, H1}, {o_bx1, H2},
                              {o_bc0, H1}, {o_bc1, H2}, {o_b, C}};
    for (int i = 0; i < 6; ++i) { lane_at[i] = ranges[i][0]; lane_n[i] = ranges[i][1]; }
  }
};

inline void transpose(const float* src, int rows, int cols, float* dst) {
  for (int i = 0; i < rows; ++i)
    for (int j = 0; j < cols; ++j) dst[j * rows + i] = src[i * cols + j];
}

void pack(const Layout& L, const float* p, float* q) {
  std::memcpy(q + L.q_w2, p + L.o_wx2, L.H2 * L.C * 4);
  std::memcpy(q + L.q_w2 + L.H2 * L.C, p + L.o_wc2, L.H2 * L.C * 4);
  transpose(p + L.o_wg, L.KXC, 2 * L.C, q + L.q_wgT);
  transpose(p + L.o_wx0, L.X, L.H1, q + L.q_wx0T);
  transpose(p + L.o_wx1, L.H1, L.H2, q + L.q_wx1T);
  transpose(q + L.q_w2, 2 * L.H2, L.C, q + L.q_w2T);
  transpose(p + L.o_wc0, L.C, L.H1, q + L.q_wc0T);
  transpose(p + L.o_wc1, L.H1, L.H2, q + L.q_wc1T);
}

// A tile's buffers, each [channels, T], in memory the thread keeps between calls (every
// buffer is written before it is read).
struct Tile {
  float *xc, *g, *z, *r, *rc, *hx0, *hc0, *h1, *cand;  // forward; c = xc + X T, h1 = [hx1; hc1]
  float *dn, *dc, *dpre, *dh1, *da, *db, *drc, *dg, *dxc, *dx;
  float *h1t, *xt, *ct, *gt;  // agent-major [T, *]: h1; hx0, then d_a; hc0, then d_b; d_g
  // The vectors of agents in use: a tile of fewer than T agents (a group's last, or a
  // group of fewer) computes only the vectors that hold its agents (10 agents: 1 of 4
  // with AVX-512).
  int nv = A;
  explicit Tile(const Layout& L) {
    const int w[] = {L.KXC, 2 * L.C, L.C, L.C, L.C, L.H1, L.H1, 2 * L.H2, L.C,
                     L.C, L.C, L.C, 2 * L.H2, L.H1, L.H1, L.C, 2 * L.C, L.KXC, L.X,
                     L.H2p2, L.H1p, L.H1p, L.C2p};
    float** ptr[] = {&xc, &g, &z, &r, &rc, &hx0, &hc0, &h1, &cand,
                     &dn, &dc, &dpre, &dh1, &da, &db, &drc, &dg, &dxc, &dx,
                     &h1t, &xt, &ct, &gt};
    size_t total = 0;
    for (int k : w) total += size_t(T) * k;
    thread_local std::vector<float> mem;
    if (mem.size() < total) mem.resize(total);
    size_t at = 0;
    for (size_t i = 0; i < sizeof w / sizeof w[0]; ++i) { *ptr[i] = mem.data() + at; at += size_t(T) * w[i]; }
  }
};

// rows agents of x [rows, X] and c [rows, C] into the tile (channel-major; zeros beyond).
void tile_load(const Layout& L, const float* x, const float* c, int rows, Tile& t) {
  t.nv = (rows + VW - 1) / VW;
  if (rows < T) std::fill(t.xc, t.xc + T * L.KXC, 0.0f);
  for (int r = 0; r < rows; ++r) {
    for (int k = 0; k < L.X; ++k) t.xc[k * T + r] = x[r * L.X + k];
    for (int k = 0; k < L.C; ++k) t.xc[(L.X + k) * T + r] = c[r * L.C + k];
  }
}

void tile_forward(const Layout& L, const float* p, const float* q, Tile& t) {
  const int C = L.C, H1 = L.H1, H2 = L.H2;
  const float* c = t.xc + L.X * T;
  dense(t.nv, t.xc, L.KXC, p + L.o_wg, 2 * C, 2 * C, p + L.o_bg, false, t.g);
  each(t.nv, C, [&](int i) {
    const vf z = sigmoid_v(load(t.g + i)), r = sigmoid_v(load(t.g + C * T + i));
    store(t.z + i, z); store(t.r + i, r); store(t.rc + i, r * load(c + i));
  });
  dense<kTanh>(t.nv, t.xc, L.X, p + L.o_wx0, H1, H1, p + L.o_bx0, false, t.hx0);
  dense<kTanh>(t.nv, t.hx0, H1, p + L.o_wx1, H2, H2, p + L.o_bx1, false, t.h1);
  dense<kTanh>(t.nv, t.rc, C, p + L.o_wc0, H1, H1, p + L.o_bc0, false, t.hc0);
  dense<kTanh>(t.nv, t.hc0, H1, p + L.o_wc1, H2, H2, p + L.o_bc1, false, t.h1 + H2 * T);
  dense<kTanh>(t.nv, t.h1, 2 * H2, q + L.q_w2, C, C, p + L.o_b, false, t.cand);  // both branches' last layers
}

// new = z c + (1 - z) cand for the tile's rows, into out [rows, C].
void tile_store_new(const Layout& L, Tile& t, int rows, float* out) {
  const float* c = t.xc + L.X * T;
  float* nw = t.dn;  // scratch
  each(t.nv, L.C, [&](int i) {
    const vf z = load(t.z + i);
    store(nw + i, z * load(c + i) + (1.0f - z) * load(t.cand + i));
  });
  for (int r = 0; r < rows; ++r)
    for (int k = 0; k < L.C; ++k) out[r * L.C + k] = nw[k * T + r];
}

// The backward pass of one tile (after tile_forward): d_x [rows, X] and d_c [rows, C];
// adds the parameters' cotangent to the chunk's sums: the weights to sums [S] (outer_t,
// on agent-major copies), the biases to the per-lane acc [P, VW].
void tile_backward(const Layout& L, const float* p, const float* q, Tile& t, const float* d_new,
                   int rows, float* acc, float* sums, float* d_x, float* d_c) {
  const int C = L.C, H1 = L.H1, H2 = L.H2, X = L.X;
  const float* c = t.xc + X * T;
  if (rows < T) std::fill(t.dn, t.dn + C * T, 0.0f);
  for (int r = 0; r < rows; ++r)
    for (int k = 0; k < C; ++k) t.dn[k * T + r] = d_new[r * C + k];
  // new = z c + (1 - z) cand; cand = tanh(pre). d_g's z half holds d_z for now.
  each(t.nv, C, [&](int i) {
    const vf dn = load(t.dn + i), z = load(t.z + i), cand = load(t.cand + i);
    store(t.dg + i, dn * (load(c + i) - cand));
    store(t.dc + i, dn * z);
    store(t.dpre + i, dn * (1.0f - z) * one_minus_sq(cand));
  });
  lane_sum(t.nv, t.dpre, C, acc + L.o_b * VW);
  transpose_tile(t.nv, t.h1, 2 * H2, t.h1t, L.H2p2);
  outer_t(t.nv, t.dpre, C, t.h1t, L.H2p2, sums + L.s_w2T);
  // Both branches' second layers at once: d_h1 = d_pre [wx2; wc2]^T, through tanh.
  dense<kTimesDtanh>(t.nv, t.dpre, C, q + L.q_w2T, 2 * H2, 2 * H2, nullptr, false, t.dh1, t.h1);
  // mlp_x: layers 1 and 0, down to d_x.
  lane_sum(t.nv, t.dh1, H2, acc + L.o_bx1 * VW);
  transpose_tile(t.nv, t.hx0, H1, t.xt, L.H1p);
  outer_t(t.nv, t.dh1, H2, t.xt, L.H1p, sums + L.s_wx1T);
  dense<kTimesDtanh>(t.nv, t.dh1, H2, q + L.q_wx1T, H1, H1, nullptr, false, t.da, t.hx0);
  lane_sum(t.nv, t.da, H1, acc + L.o_bx0 * VW);
  transpose_tile(t.nv, t.da, H1, t.xt, L.H1p);
  outer_t(t.nv, t.xc, X, t.xt, L.H1p, sums + L.s_wx0);
  dense(t.nv, t.da, H1, q + L.q_wx0T, X, X, nullptr, false, t.dx);
  // mlp_c, the same way, down to d_rc.
  const float* dhc1 = t.dh1 + H2 * T;
  lane_sum(t.nv, dhc1, H2, acc + L.o_bc1 * VW);
  transpose_tile(t.nv, t.hc0, H1, t.ct, L.H1p);
  outer_t(t.nv, dhc1, H2, t.ct, L.H1p, sums + L.s_wc1T);
  dense<kTimesDtanh>(t.nv, dhc1, H2, q + L.q_wc1T, H1, H1, nullptr, false, t.db, t.hc0);
  lane_sum(t.nv, t.db, H1, acc + L.o_bc0 * VW);
  transpose_tile(t.nv, t.db, H1, t.ct, L.H1p);
  outer_t(t.nv, t.rc, C, t.ct, L.H1p, sums + L.s_wc0);
  dense(t.nv, t.db, H1, q + L.q_wc0T, C, C, nullptr, false, t.drc);
  // The gates: d_c += d_rc r; d_g = [d_z z (1 - z) | d_rc c r (1 - r)].
  each(t.nv, C, [&](int i) {
    const vf z = load(t.z + i), r = load(t.r + i), drc = load(t.drc + i);
    store(t.dc + i, load(t.dc + i) + drc * r);
    store(t.dg + i, load(t.dg + i) * z * (1.0f - z));
    store(t.dg + C * T + i, drc * load(c + i) * r * (1.0f - r));
  });
  lane_sum(t.nv, t.dg, 2 * C, acc + L.o_bg * VW);
  transpose_tile(t.nv, t.dg, 2 * C, t.gt, L.C2p);
  outer_t(t.nv, t.xc, L.KXC, t.gt, L.C2p, sums + L.s_wg);
  dense(t.nv, t.dg, 2 * C, q + L.q_wgT, L.KXC, L.KXC, nullptr, false, t.dxc);
  for (int r = 0; r < rows; ++r) {
    for (int k = 0; k < X; ++k) d_x[r * X + k] = t.dx[k * T + r] + t.dxc[k * T + r];
    for (int k = 0; k < C; ++k) d_c[r * C + k] = t.dc[k * T + r] + t.dxc[(X + k) * T + r];
  }
}

// The calling thread's floating-point control (x86: MXCSR, whose flush-to-zero and
// denormals-are-zero bits XLA's threads set), for the workers to run under.
inline unsigned fp_control() {
#if defined(__SSE__)
  return _mm_getcsr();
#else
  return 0;
#endif
}
inline void set_fp_control(unsigned csr) {
#if defined(__SSE__)
  _mm_setcsr(csr);
#else
  (void)csr;
#endif
}

// A small pool of workers (the calling thread is one of them) that runs fn(task) for
// task in [0, n), each task once, on whichever worker takes it next, every worker under
// the caller's floating-point control. (A thread inherits its creator's: the workers
// would otherwise keep that of whichever thread first called the kernel, and with
// denormals that the caller flushes to zero and a worker does not, that worker's agents
// would get other numbers.) Calls that find the pool busy (two XLA threads at once) run
// inline. A worker that finishes polls for the next call for kSpin (yielding its core to
// any other runnable thread) before it sleeps: in a meta-step the calls follow each
// other closely (the sinusoid meta-step: 90 calls, ~14 ms of XLA work between them), and
// a sleeping worker took 0.16 ms on average to wake (measured over those calls), most of
// a small call's time, during which the caller ran alone.
class Pool {
 public:
  Pool() : pid_(getpid()) {
    cpu_set_t set;
    int n = sched_getaffinity(0, sizeof set, &set) == 0 ? CPU_COUNT(&set) : 1;
    for (int i = 1; i < std::max(1, n); ++i) workers_.emplace_back([this] { Work(); });
  }
  int size() const { return static_cast<int>(workers_.size()) + 1; }
  void Run(int n, const std::function<void(int)>& fn) {
    std::unique_lock<std::mutex> busy(busy_, std::try_to_lock);
    // Inline when busy, alone, or in a forked child (which has none of the workers).
    if (!busy.owns_lock() || workers_.empty() || n == 1 || getpid() != pid_) {
      for (int i = 0; i < n; ++i) fn(i);
      return;
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      fn_ = &fn; n_ = n; next_.store(0); done_ = 0; csr_ = fp_control(); ++generation_;
      posted_.store(generation_, std::memory_order_release);
    }
    cv_.notify_all();
    Drain();
    std::unique_lock<std::mutex> lock(mu_);
    done_cv_.wait(lock, [this] { return done_ == static_cast<int>(workers_.size()); });
    fn_ = nullptr;
  }

 private:
  void Drain() {
    for (int i; (i = next_.fetch_add(1)) < n_;) (*fn_)(i);
  }
  void Work() {
    long seen = 0;
    for (;;) {
      const auto until = std::chrono::steady_clock::now() + kSpin;
      while (posted_.load(std::memory_order_acquire) == seen && std::chrono::steady_clock::now() < until)
        sched_yield();
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [&] { return generation_ != seen; });
        seen = generation_;
        set_fp_control(csr_);
      }
      Drain();
      std::lock_guard<std::mutex> lock(mu_);
      if (++done_ == static_cast<int>(workers_.size())) done_cv_.notify_one();
    }
  }
  const pid_t pid_;
  std::vector<std::thread> workers_;
  std::mutex busy_, mu_;
  std::condition_variable cv_, done_cv_;
  const std::function<void(int)>* fn_ = nullptr;
  std::atomic<int> next_{0};
  int n_ = 0, done_ = 0;
  unsigned csr_ = 0;
  long generation_ = 0;
  std::atomic<long> posted_{0};  // generation_, read without the lock by spinning workers
  static constexpr std::chrono::microseconds kSpin{1000};
};

Pool& pool() {
  static Pool* p = new Pool();  // never destroyed: workers outlive static destruction
  return *p;
}

struct Dims { int64_t G, n, X, C, Gp, P; };

ffi::Error check(const Dims& d, const Layout& L) {
  if (d.Gp != 1 && d.Gp != d.G) return ffi::Error::InvalidArgument("params: leading dim must be 1 or G");
  if (d.P != L.P) return ffi::Error::InvalidArgument("params: wrong size for (X, C, H1, H2)");
  return ffi::Error::Success();
}

// The calls' work: G groups of ceil(n / T) tiles, cut into chunks of contiguous tiles,
// about 4 per thread, that the threads take as they come free (a late or slowed worker
// leaves its chunks to the others instead of holding the call back).
struct Work {
  int64_t tiles_per_group, total, per_chunk;
  int chunks;
  Work(int64_t n, int64_t G, int threads) {
    tiles_per_group = (n + T - 1) / T;
    total = G * tiles_per_group;
    per_chunk = std::max<int64_t>(1, (total + 4 * threads - 1) / (4 * threads));
    chunks = static_cast<int>((total + per_chunk - 1) / per_chunk);
  }
  int64_t begin(int chunk) const { return chunk * per_chunk; }
  int64_t end(int chunk) const { return std::min(total, (chunk + 1) * per_chunk); }
  int64_t group(int64_t tile) const { return tile / tiles_per_group; }
};

// What both calls start from: the shapes, checked, and the packed parameters.
struct Call {
  Dims d;
  Layout L;
  std::vector<float> packed;
  ffi::Error error = ffi::Error::Success();
  Call(ffi::Buffer<ffi::F32>& x, ffi::Buffer<ffi::F32>& c, ffi::Buffer<ffi::F32>& params, int64_t h1, int64_t h2)
      : d{x.dimensions()[0], x.dimensions()[1], x.dimensions()[2], c.dimensions()[2],
          params.dimensions()[0], params.dimensions()[1]},
        L(d.X, d.C, h1, h2) {
    if (c.dimensions()[0] != d.G || c.dimensions()[1] != d.n) {
      error = ffi::Error::InvalidArgument("c: leading dims must equal x's [G, n]");
      return;
    }
    error = check(d, L);
    if (error.failure()) return;
    packed.resize(d.Gp * L.Q);
    for (int64_t g = 0; g < d.Gp; ++g) pack(L, params.typed_data() + g * L.P, packed.data() + g * L.Q);
  }
};

ffi::Error Forward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> c, ffi::Buffer<ffi::F32> params,
                   int64_t h1, int64_t h2, ffi::ResultBuffer<ffi::F32> out) {
  const Call call(x, c, params, h1, h2);
  if (call.error.failure()) return call.error;
  const Dims& d = call.d;
  const Layout& L = call.L;
  const std::vector<float>& packed = call.packed;
  Pool& workers = pool();
  const Work w(d.n, d.G, workers.size());
  const float *xp = x.typed_data(), *cp = c.typed_data(), *pp = params.typed_data();
  float* op = out->typed_data();
  workers.Run(w.chunks, [&](int chunk) {
    Tile t(L);
    for (int64_t i = w.begin(chunk); i < w.end(chunk); ++i) {
      const int64_t g = w.group(i), tile = i % w.tiles_per_group;
      const int64_t pg = d.Gp == 1 ? 0 : g, a = g * d.n + tile * T;
      const int rows = static_cast<int>(std::min<int64_t>(T, d.n - tile * T));
      tile_load(L, xp + a * d.X, cp + a * d.C, rows, t);
      tile_forward(L, pp + pg * L.P, packed.data() + pg * L.Q, t);
      tile_store_new(L, t, rows, op + a * d.C);
    }
  });
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> c, ffi::Buffer<ffi::F32> params,
                    ffi::Buffer<ffi::F32> d_new, int64_t h1, int64_t h2,
                    ffi::ResultBuffer<ffi::F32> d_x, ffi::ResultBuffer<ffi::F32> d_c,
                    ffi::ResultBuffer<ffi::F32> d_params) {
  const Call call(x, c, params, h1, h2);
  if (call.error.failure()) return call.error;
  const Dims& d = call.d;
  const Layout& L = call.L;
  const std::vector<float>& packed = call.packed;
  Pool& workers = pool();
  const Work w(d.n, d.G, workers.size());
  // Each chunk's cotangent sum for each group it covers goes to its own row of parts
  // (chunk c's share of group g: row c + g, unique since chunks are contiguous runs of
  // tiles), then the rows are added in chunk order: the same numbers whichever thread ran
  // which chunk.
  // (parts is the calling thread's; the chunks, on any thread, reach it through part_rows.)
  thread_local std::vector<float> parts;
  const int64_t rows_n = std::max<int64_t>(0, w.chunks + d.G - 1);
  if (parts.size() < size_t(rows_n * L.P)) parts.resize(size_t(rows_n * L.P));
  float* const part_rows = parts.data();
  const float *xp = x.typed_data(), *cp = c.typed_data(), *pp = params.typed_data();
  const float* dnp = d_new.typed_data();
  float *dxp = d_x->typed_data(), *dcp = d_c->typed_data();
  workers.Run(w.chunks, [&](int chunk) {
    Tile t(L);
    thread_local std::vector<float> lanes, sums;  // all zeros between uses (flush zeroes them)
    if (lanes.size() < size_t(L.P) * VW) lanes.assign(size_t(L.P) * VW, 0.0f);
    if (sums.size() < size_t(L.S)) sums.assign(L.S, 0.0f);
    int64_t group = -1;
    auto flush = [&] {  // lanes' and sums' totals into the chunk's row for group; both to zero
      if (group < 0) return;
      float* sum = part_rows + (chunk + group) * L.P;
      std::fill(sum, sum + L.P, 0.0f);
      for (int i = 0; i < 6; ++i)
        for (int k = L.lane_at[i]; k < L.lane_at[i] + L.lane_n[i]; ++k) {
          float* lane = lanes.data() + size_t(k) * VW;
          float s = 0.0f;
          for (int l = 0; l < VW; ++l) s += lane[l];
          sum[k] = s;
          std::fill(lane, lane + VW, 0.0f);
        }
      // sums [rows, cols] (row stride ld) into sum[at + col * cstride + row * rstride]
      auto put = [&](int from, int rows, int cols, int ld, int at, int cstride, int rstride) {
        for (int row = 0; row < rows; ++row)
          for (int col = 0; col < cols; ++col) sum[at + col * cstride + row * rstride] += sums[from + row * ld + col];
      };
      const int C = L.C, H1 = L.H1, H2 = L.H2;
      put(L.s_w2T, C, H2, L.H2p2, L.o_wx2, C, 1);            // [wx2; wc2]^T: wx2 [H2, C]
      put(L.s_w2T + H2, C, H2, L.H2p2, L.o_wc2, C, 1);       //               wc2 [H2, C]
      put(L.s_wx1T, H2, H1, L.H1p, L.o_wx1, H2, 1);          // wx1^T: wx1 [H1, H2]
      put(L.s_wc1T, H2, H1, L.H1p, L.o_wc1, H2, 1);          // wc1^T: wc1 [H1, H2]
      put(L.s_wx0, L.X, H1, L.H1p, L.o_wx0, 1, H1);          // wx0 [X, H1]
      put(L.s_wc0, C, H1, L.H1p, L.o_wc0, 1, H1);            // wc0 [C, H1]
      put(L.s_wg, L.KXC, 2 * C, L.C2p, L.o_wg, 1, 2 * C);    // wg [X + C, 2C]
      std::fill(sums.begin(), sums.begin() + L.S, 0.0f);
    };
    for (int64_t i = w.begin(chunk); i < w.end(chunk); ++i) {
      const int64_t g = w.group(i), tile = i % w.tiles_per_group;
      if (g != group) { flush(); group = g; }
      const int64_t pg = d.Gp == 1 ? 0 : g, a = g * d.n + tile * T;
      const int rows = static_cast<int>(std::min<int64_t>(T, d.n - tile * T));
      const float *p = pp + pg * L.P, *q = packed.data() + pg * L.Q;
      tile_load(L, xp + a * d.X, cp + a * d.C, rows, t);
      tile_forward(L, p, q, t);
      tile_backward(L, p, q, t, dnp + a * d.C, rows, lanes.data(), sums.data(), dxp + a * d.X, dcp + a * d.C);
    }
    flush();
  });
  float* dp = d_params->typed_data();
  std::fill(dp, dp + d.G * L.P, 0.0f);
  for (int chunk = 0; chunk < w.chunks; ++chunk)
    for (int64_t g = w.group(w.begin(chunk)); g <= w.group(w.end(chunk) - 1); ++g) {
      const float* part = part_rows + (chunk + g) * L.P;
      float* to = dp + g * L.P;
      for (int k = 0; k < L.P; ++k) to[k] += part[k];
    }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MplpCellForward, Forward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("h1")
                                  .Attr<int64_t>("h2")
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(MplpCellBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("h1")
                                  .Attr<int64_t>("h2")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
