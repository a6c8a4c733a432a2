// Every primitive of one ISA layer against the Generic layer, without PyTorch: random blocks,
// tails and odd sizes, each with its stated bound. Built for the layer named by -DGEMMARUN_ISA_*
// (tests/test_kernel_native.py builds it natively and for AArch64, run under qemu-aarch64-static):
//   g++ -O2 -std=c++17 -mavx2 -mfma -mf16c -DGEMMARUN_ISA_AVX2 primitives_test.cpp -o t && ./t
// The Generic layer is checked too: its quantised product against float64 sums of the same weights.
// Prints one line per check and exits 1 if any fails.
#include <cinttypes>
#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "../../gemmarun/kernels/isa/generic.h"
#include "../../gemmarun/kernels/isa/select.h"
#include "../../gemmarun/kernels/src/qdot.h"

using namespace gemmarun_isa;
using V = Isa;  // the layer under test
using G = Generic;

namespace {

int failures = 0;
std::mt19937 rng(1234);

// err <= bound, reported with the worst ratio; NaN counts as a failure.
struct Check {
  std::string name;
  double worst = 0.0;
  bool ok = true;
  explicit Check(std::string n) : name(std::move(n)) {}
  void operator()(double err, double bound) {
    if (!(err <= bound)) ok = false;
    if (bound > 0 && err / bound > worst) worst = err / bound;
  }
  ~Check() {
    std::printf("%-4s %-48s worst err/bound %.3g\n", ok ? "ok" : "FAIL", name.c_str(), worst);
    if (!ok) ++failures;
  }
};

float uniform(float lo, float hi) { return std::uniform_real_distribution<float>(lo, hi)(rng); }
int randint(int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); }

std::vector<float> randn(int64_t n, float scale = 1.f) {
  std::normal_distribution<float> d(0.f, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

// A positive binary16 in [2^-7, 4): random mantissa, exponent 8..16.
half random_half() { return half{static_cast<uint16_t>((randint(8, 16) << 10) | randint(0, 1023))}; }
bfloat16 to_bf16(float f) { return bfloat16{static_cast<uint16_t>(float_bits(f) >> 16)}; }  // truncation: any bf16 will do

// ---- the quantised product ----

// One packed matrix in qlinear's layouts, with its values as float64 for the reference.
struct Matrix {
  int bits, group;
  bool half_scales, with_mins;
  float zero;
  int64_t N, K;
  std::vector<uint8_t> q;
  std::vector<float> sf, mf;  // float32 scales / mins
  std::vector<half> sh, mh;  // or float16
  std::vector<double> w;  // (N, K) dequantised
  std::vector<double> terms;  // (N, K) |scale q| + |scale zero| + |min|: what the kernel's sums add up

  float scale(int64_t i) const { return half_scales ? to_float(sh[i]) : sf[i]; }
  float min(int64_t i) const { return !with_mins ? 0.f : half_scales ? to_float(mh[i]) : mf[i]; }
};

Matrix make_matrix(int bits, int group, bool half_scales, bool with_mins, float zero, int64_t N, int64_t K) {
  Matrix m{bits, group, half_scales, with_mins, zero, N, K, {}, {}, {}, {}, {}, {}, {}};
  const int64_t ng = K / group, row_bytes = K * bits / 8;
  m.q.resize(N * row_bytes);
  for (int64_t i = 0; i < N * ng; ++i) {
    if (half_scales) {
      m.sh.push_back(random_half());
      m.mh.push_back(half{static_cast<uint16_t>(random_half().x | (randint(0, 1) << 15))});
    } else {
      m.sf.push_back(uniform(0.01f, 2.f));
      m.mf.push_back(uniform(-1.f, 1.f));
    }
  }
  m.w.resize(N * K);
  m.terms.resize(N * K);
  for (int64_t n = 0; n < N; ++n) {
    uint8_t* row = m.q.data() + n * row_bytes;
    for (int64_t b = 0; b < K / QK; ++b) {
      int code[QK];  // the value each position decodes to, before the zero
      uint8_t* blk = row + b * (QK * bits / 8);
      if (bits == 8) {
        for (int j = 0; j < QK; ++j) blk[j] = static_cast<uint8_t>(static_cast<int8_t>(code[j] = randint(-128, 127)));
      } else if (bits == 4) {
        for (int j = 0; j < QK; ++j) code[j] = randint(0, 15);
        for (int j = 0; j < 16; ++j) blk[j] = static_cast<uint8_t>(code[j] | (code[j + 16] << 4));
      } else {  // q6: codes q + 32 stored; q in -32..31
        int u[QK];
        for (int j = 0; j < QK; ++j) code[j] = (u[j] = randint(0, 63)) - 32;
        for (int j = 0; j < 16; ++j) blk[j] = static_cast<uint8_t>((u[j] & 15) | ((u[j + 16] & 15) << 4));
        uint64_t top = 0;
        for (int v = 0; v < QK; ++v) top |= uint64_t(u[v] >> 4) << high_bit(v);
        std::memcpy(blk + 16, &top, sizeof top);
      }
      for (int j = 0; j < QK; ++j) {
        const int64_t k = b * QK + j, g = n * ng + k / group;
        m.w[n * K + k] = double(m.scale(g)) * (code[j] - double(zero)) + double(m.min(g));
        m.terms[n * K + k] = std::fabs(double(m.scale(g))) * (std::abs(code[j]) + 32.0 * (bits == 6) + std::fabs(zero)) + std::fabs(double(m.min(g)));
      }
    }
  }
  return m;
}

// y (M, N) through the qdot core of layer I, single-threaded, as qlinear.cpp runs it.
template <class I>
std::vector<float> qmatmul(const std::vector<float>& x, int64_t M, const Matrix& m) {
  const int64_t K = m.K, nb = K / QK;
  QuantisedRows r;
  r.q.resize(M * K), r.d.resize(M * nb), r.s.resize(M * nb);
  quantise_blocks<I>(x.data(), 0, M * nb, r);
  std::vector<float> out(M * m.N), xg;
  // qlinear.cpp: the kernel's q6 codes are q + 32, so from 32 values a group on the 32 joins the zero
  const float zero = m.zero + (m.bits == 6 && m.group != 16 ? 32.f : 0.f);
  Weight w{m.q.data(), m.half_scales ? static_cast<const void*>(m.sh.data()) : m.sf.data(),
           !m.with_mins ? nullptr : m.half_scales ? static_cast<const void*>(m.mh.data()) : m.mf.data(),
           m.half_scales, m.bits, m.group, m.N, zero, out.data(), nullptr};
  if (zero != 0.f || m.with_mins) {
    xg.resize(M * (K / m.group));
    group_sums(r, M, K, m.group, xg.data());
    w.xg = xg.data();
  }
  for (int64_t t = 0; t < m.N; t += 16) matrix_rows<I>(w, r, M, K, t, std::min<int64_t>(t + 16, m.N));
  return out;
}

void check_quantise() {
  Check c(std::string("quantise_block: d, s and codes equal (") + V::name + ")");
  for (int t = 0; t < 200; ++t) {
    std::vector<float> x = randn(QK, t % 3 == 0 ? 1e-3f : 3.f);
    if (t % 7 == 0) std::fill(x.begin(), x.end(), 0.f);  // an all-zero block: d = 0
    if (t % 5 == 0) x[randint(0, QK - 1)] = -50.f;  // the extreme code at -32767
    int16_t qg[QK], qv[QK];
    float sg, sv;
    const float dg = G::quantise_block(x.data(), qg, &sg), dv = V::quantise_block(x.data(), qv, &sv);
    c(dg == dv && sg == sv ? 0.0 : 1.0, 0.0);
    // the codes, compared through the layer's own order: a one-hot weight block picks each out
    for (int j = 0; j < QK; ++j) {
      std::vector<uint8_t> blk(PREFETCH + QK, 0);  // room for the layer's prefetch address
      blk[j] = 1;
      const auto d = V::block_dot(V::load_block<8>(blk.data(), 0), V::load_x(qv));
      c(V::facc_sum(V::fma_dot(V::facc_zero(), d, 1.f)) == float(qg[j]) ? 0.0 : 1.0, 0.0);
      const float half_factor = 0.5f;  // exact: the code is an integer below 2^15
      c(V::facc_sum(V::fma_dot_at(V::facc_zero(), d, &half_factor)) == 0.5f * float(qg[j]) ? 0.0 : 1.0, 0.0);
    }
  }
}

void check_qmatmul() {
  struct Scheme {
    int bits, group;
    bool half_scales, mins;
    float zero;
  };
  const Scheme schemes[] = {
      {8, 0, false, false, 0.f},  // int8 per channel (group K)
      {8, 32, true, false, 0.f},  // Q8_0
      {8, 16, true, false, 0.f},  // Q6_K-like sub-blocks of 16, 8-bit
      {4, 32, true, false, 8.f},  // Q4_0
      {4, 32, true, true, 0.f},  // Q4_1
      {4, 64, false, true, 0.f},  // int4 g64 with mins (quantize's int4)
      {4, 128, true, true, 0.f},  // groups over several blocks
      {6, 32, true, false, 0.f},  // quantize's 6-bit embedding
      {6, 16, true, false, 0.f},  // Q6_K sub-blocks
      {6, 64, false, true, 0.f},  // 6-bit with mins
      {8, 32, false, true, 3.f},  // zero and mins together
  };
  const int64_t Ms[] = {1, 2, 3, 4, 5, 7, 9};
  const int64_t Ns[] = {1, 3, 17, 40};
  for (const Scheme& s : schemes) {
    char name[96];
    std::snprintf(name, sizeof name, "qdot bits %d group %d %s%s zero %g", s.bits, s.group, s.half_scales ? "f16" : "f32",
                  s.mins ? " mins" : "", s.zero);
    Check vs_generic(std::string(name) + " vs generic");
    Check vs_f64(std::string(name) + " generic vs f64");
    Check batch(std::string(name) + " batch rows equal one-row bits");
    for (int64_t K : {64, 128, 384}) {
      const int group = s.group ? s.group : int(K);
      if (K % group) continue;
      for (int64_t N : Ns) {
        const Matrix m = make_matrix(s.bits, group, s.half_scales, s.mins, s.zero, N, K);
        for (int64_t M : Ms) {
          const std::vector<float> x = randn(M * K);
          const std::vector<float> yg = qmatmul<G>(x, M, m), yv = qmatmul<V>(x, M, m);
          // A row of a batch has the bits it has alone (speculative verification relies on it).
          for (int64_t i = 0; M > 1 && i < M; ++i) {
            const std::vector<float> row(x.begin() + i * K, x.begin() + (i + 1) * K);
            const std::vector<float> og = qmatmul<G>(row, 1, m), ov = qmatmul<V>(row, 1, m);
            batch(std::memcmp(og.data(), yg.data() + i * N, N * sizeof(float)) || std::memcmp(ov.data(), yv.data() + i * N, N * sizeof(float)) ? 1.0 : 0.0, 0.0);
          }
          for (int64_t i = 0; i < M; ++i)
            for (int64_t n = 0; n < N; ++n) {
              double ref = 0, mag = 0, amax = 0;
              for (int64_t k = 0; k < K; ++k) {
                ref += double(x[i * K + k]) * m.w[n * K + k];
                mag += std::fabs(double(x[i * K + k])) * m.terms[n * K + k];
                amax = std::max(amax, std::fabs(double(x[i * K + k])));
              }
              double wsum = 0;
              for (int64_t k = 0; k < K; ++k) wsum += std::fabs(m.w[n * K + k]);
              const double got = yg[i * N + n];
              // float32 sums of exact int32 block products: a few roundings of 2^-24 per block
              vs_generic(std::fabs(double(yv[i * N + n]) - got), 1e-6 * mag + 1e-30);
              // activations rounded to int16: |x - x^| <= amax / 65534 per value, plus the sums
              vs_f64(std::fabs(got - ref), amax / 65534.0 * wsum + 1e-6 * mag + 1e-30);
            }
        }
      }
    }
  }
}

// ---- float kernels ----

// `count` rows of n values made from normal draws, and a pointer to each in ptr.
template <typename T>
std::vector<std::vector<T>> random_rows(int count, int64_t n, T (*make)(float), std::vector<const T*>& ptr) {
  std::vector<std::vector<T>> rows(count, std::vector<T>(n));
  for (auto& row : rows) {
    const std::vector<float> v = randn(n);
    for (int64_t i = 0; i < n; ++i) row[i] = make(v[i]);
    ptr.push_back(row.data());
  }
  return rows;
}

template <typename T>
void check_dot_axpy(const char* type, T (*make)(float)) {
  Check c(std::string("dot and axpy over ") + type);
  for (int64_t n : {1, 3, 7, 8, 9, 15, 16, 17, 64, 72, 130, 256}) {
    const std::vector<float> a = randn(n), base = randn(n);
    std::vector<T> b(n);
    for (int64_t i = 0; i < n; ++i) b[i] = make(base[i]);
    double mag = 0;
    for (int64_t i = 0; i < n; ++i) mag += std::fabs(a[i] * to_float(b[i]));
    c(std::fabs(double(V::dot(a.data(), b.data(), n)) - G::dot(a.data(), b.data(), n)), 1e-6 * mag + 1e-30);
    std::vector<float> yg = randn(n), yv = yg;
    G::axpy(0.37f, b.data(), yg.data(), n);
    V::axpy(0.37f, b.data(), yv.data(), n);
    for (int64_t i = 0; i < n; ++i) c(std::fabs(yv[i] - yg[i]), 2e-7 * (std::fabs(yg[i]) + std::fabs(0.37f * to_float(b[i]))));
  }
  // dots and axpys: exactly the bits of dot and axpy one at a time (attention's scores and sums
  // rest on it: a key's terms must not depend on how many keys a call takes at once)
  Check e(std::string("dots and axpys over ") + type + " equal dot and axpy");
  for (int64_t n : {1, 7, 8, 9, 63, 64, 65, 72, 130, 256}) {
    std::vector<const T*> ptr;
    const auto rows = random_rows(5, n, make, ptr);
    const std::vector<float> a = randn(n), p = randn(5);
    float four[4], one;
    V::template dots<4>(a.data(), ptr.data() + 1, n, four);
    for (int j = 0; j < 4; ++j) e(four[j] == V::dot(a.data(), ptr[1 + j], n) ? 0.0 : 1.0, 0.0);
    V::template dots<1>(a.data(), ptr.data(), n, &one);
    e(one == V::dot(a.data(), ptr[0], n) ? 0.0 : 1.0, 0.0);
    for (int64_t m : {0, 1, 5}) {
      std::vector<float> ys = randn(n), y1 = ys;
      V::axpys(p.data(), ptr.data(), m, ys.data(), n);
      for (int64_t s = 0; s < m; ++s) V::axpy(p[s], ptr[s], y1.data(), n);
      for (int64_t i = 0; i < n; ++i) e(ys[i] == y1[i] ? 0.0 : 1.0, 0.0);
    }
  }
}

// Dense weight rows: x stored by dense_order, then dense_dots against Generic's plain dot, and each
// of four rows with the bits it gets alone (a dense decode row must not depend on its batch).
template <typename T>
void check_dense(const char* type, T (*make)(float)) {
  Check c(std::string("dense_dots over ") + type + " against generic");
  Check e(std::string("dense_dots over ") + type + ": 4 rows equal 1");
  for (int64_t n : {1, 7, 15, 16, 17, 31, 32, 48, 64, 100, 640, 2304}) {
    const std::vector<float> a = randn(n);
    std::vector<const T*> ptr;
    const auto rows = random_rows(4, n, make, ptr);
    std::vector<float> xp(n);
    V::template dense_order<T>(a.data(), n, xp.data());
    float four[4];
    V::template dense_dots<4>(xp.data(), ptr.data(), n, four);
    for (int j = 0; j < 4; ++j) {
      double mag = 0;
      for (int64_t i = 0; i < n; ++i) mag += std::fabs(a[i] * to_float(rows[j][i]));
      c(std::fabs(double(four[j]) - G::dot(a.data(), ptr[j], n)), 1e-6 * mag + 1e-30);
      float one;
      V::template dense_dots<1>(xp.data(), ptr.data() + j, n, &one);
      e(one == four[j] ? 0.0 : 1.0, 0.0);
    }
  }
}

void check_half_conversion() {
  // Every binary16 pattern widened by the layer (axpy of 1 onto 0) against Generic's bit arithmetic.
  Check c("float16 widening, all 65536 values");
  std::vector<half> h(65536);
  for (int i = 0; i < 65536; ++i) h[i] = half{static_cast<uint16_t>(i)};
  std::vector<float> y(65536, 0.f);
  V::axpy(1.f, h.data(), y.data(), 65536);
  for (int i = 0; i < 65536; ++i) {
    const float g = to_float(h[i]);
    c(std::isnan(g) ? (std::isnan(y[i]) ? 0.0 : 1.0) : (y[i] == g ? 0.0 : 1.0), 0.0);  // -0 + 0 is +0: == accepts it
  }
}

void check_elementwise() {
  Check norm("sum_squares and norm_row (with and without residual)");
  for (int64_t n : {1, 5, 8, 13, 64, 72, 640, 1153}) {
    const std::vector<float> x = randn(n, 2.f), w = randn(n, 0.5f), res = randn(n);
    double mag = 0;
    for (float v : x) mag += double(v) * v;
    norm(std::fabs(double(V::sum_squares(x.data(), n)) - G::sum_squares(x.data(), n)), 1e-6 * mag);
    for (const float* r : {static_cast<const float*>(nullptr), res.data()}) {
      std::vector<float> og(n), ov(n);
      G::norm_row(x.data(), 0.7f, w.data(), r, og.data(), n);
      V::norm_row(x.data(), 0.7f, w.data(), r, ov.data(), n);
      for (int64_t i = 0; i < n; ++i) norm(std::fabs(ov[i] - og[i]), 4e-7 * (std::fabs(og[i]) + (r ? std::fabs(r[i]) : 0.f)) + 1e-30);
    }
  }
  Check gelu("geglu_row, tails and extremes");
  for (int64_t n : {1, 7, 8, 9, 31, 1000, 4099}) {
    std::vector<float> g = randn(n, 4.f), u = randn(n);
    for (int64_t i = 0; i < n; i += 11) g[i] = uniform(-90.f, 90.f);
    std::vector<float> og(n), ov(n);
    G::geglu_row(g.data(), u.data(), og.data(), n);
    V::geglu_row(g.data(), u.data(), ov.data(), n);
    // the vector exp is within 2 ulp of expf; x / (1 + e) keeps that relative error
    for (int64_t i = 0; i < n; ++i) gelu(std::fabs(ov[i] - og[i]), 1e-6 * std::fabs(og[i]) + 1e-9 * std::fabs(u[i]));
  }
  const float edge[8] = {1e30f, -1e30f, 0.f, INFINITY, -0.f, 3.f, -3.f, 1e-30f};
  const float ones[8] = {1, 1, 1, 1, 1, 1, 1, 1};
  float og[8], ov[8];
  G::geglu_row(edge, ones, og, 8);
  V::geglu_row(edge, ones, ov, 8);
  for (int i = 0; i < 8; ++i) {
    // the vector exps clamp their argument at 88.3 (2^n stays normal): x / (1 + e^88.3) for huge -x
    const bool same = og[i] == ov[i] || std::fabs(og[i] - ov[i]) <= 1e-6f * std::fabs(og[i]) + 1e-38f * std::fabs(edge[i]);
    if (!same) std::printf("     geglu(%g): generic %g, %s %g\n", edge[i], og[i], V::name, ov[i]);
    gelu(same ? 0.0 : 1.0, 0.0);
  }
}

void check_search() {
  Check c("int4 search: group_stats, round_levels, weighted_error");
  for (int n : {8, 16, 32, 64, 256}) {
    for (int t = 0; t < 20; ++t) {
      const std::vector<float> x = randn(n, uniform(0.01f, 2.f));
      std::vector<float> wt(n);
      for (auto& v : wt) v = uniform(0.f, 3.f);
      float lg, hg, swg, sxg, lv, hv, swv, sxv;
      G::group_stats(x.data(), wt.data(), n, &lg, &hg, &swg, &sxg);
      V::group_stats(x.data(), wt.data(), n, &lv, &hv, &swv, &sxv);
      double mag_w = 0, mag_x = 0;
      for (int j = 0; j < n; ++j) mag_w += wt[j], mag_x += std::fabs(wt[j] * x[j]);
      c(lg == lv && hg == hv ? 0.0 : 1.0, 0.0);
      c(std::fabs(swv - swg), 1e-6 * mag_w);
      c(std::fabs(sxv - sxg), 1e-6 * mag_x);
      const float inv = (kLevels - 1 + 0.1f * t) / (hg - lg);
      std::vector<float> levg(n), levv(n);
      float a[3], b[3];
      G::round_levels(x.data(), wt.data(), n, lg, inv, levg.data(), &a[0], &a[1], &a[2]);
      V::round_levels(x.data(), wt.data(), n, lg, inv, levv.data(), &b[0], &b[1], &b[2]);
      c(levg == levv ? 0.0 : 1.0, 0.0);  // the same product rounded the same way
      double m2 = 0, mx = 0;
      for (int j = 0; j < n; ++j) m2 += wt[j] * levg[j] * levg[j], mx += std::fabs(wt[j] * levg[j] * x[j]);
      c(std::fabs(b[0] - a[0]), 1e-6 * 15 * mag_w);
      c(std::fabs(b[1] - a[1]), 1e-6 * m2);
      c(std::fabs(b[2] - a[2]), 1e-6 * mx);
      const float s = (hg - lg) / kLevels;
      const float eg = G::weighted_error(x.data(), wt.data(), levg.data(), n, s, lg);
      const float ev = V::weighted_error(x.data(), wt.data(), levg.data(), n, s, lg);
      c(std::fabs(ev - eg), 1e-5 * eg + 1e-30);
    }
  }
}

}  // namespace

int main() {
  std::printf("layer %s against generic\n", V::name);
  check_quantise();
  check_qmatmul();
  check_dot_axpy<float>("float32", [](float f) { return f; });
  check_dot_axpy<half>("float16", [](float) { return half{static_cast<uint16_t>(random_half().x | (randint(0, 1) << 15))}; });
  check_dot_axpy<bfloat16>("bfloat16", to_bf16);
  check_dense<float>("float32", [](float f) { return f; });
  check_dense<bfloat16>("bfloat16", to_bf16);
  check_half_conversion();
  check_elementwise();
  check_search();
  std::printf("%s: %d failed\n", V::name, failures);
  return failures ? 1 : 0;
}
