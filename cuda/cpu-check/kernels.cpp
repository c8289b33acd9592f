// Every kernel of cuda/ on the host emulation, against float64 oracles (f32 kernels, within
// 1e-4 of the largest expected magnitude) and against the f32 kernels (bf16 kernels, within
// 1e-2, or exactly where the inputs are exactly representable). Built and run by
// scripts/cuda-cpu-check.sh, which prepends the program the backend compiles.
#include <cstdio>
#include <random>
#include <algorithm>
#include <map>
#include <string>
#include <tuple>
typedef std::vector<float> V;
typedef std::vector<double> D;
std::mt19937 rng(1);
V rnd(size_t n, float s) { std::uniform_real_distribution<float> d(-s, s); V v(n); for (auto& x : v) x = d(rng); return v; }
int failures = 0;
void check(const char* what, const V& got, const D& want) {
    double scale = 1e-12, err = 0; size_t at = 0;
    for (double w : want) scale = std::max(scale, std::fabs(w));
    for (size_t i = 0; i < got.size(); i++) {
        if (!std::isfinite(got[i])) { printf("FAIL %s: element %zu is %f\n", what, i, got[i]); failures++; return; }
        double e = std::fabs(got[i] - want[i]); if (e > err) { err = e; at = i; }
    }
    bool ok = err / scale <= 1e-4 && got.size() == want.size();
    if (!ok) failures++;
    printf("%s %s: rel err %.2e (at %zu: %f vs %f)\n", ok ? "ok  " : "FAIL", what, err / scale, at, got.empty() ? 0 : got[at], want.empty() ? 0 : want[at]);
}
dim3 g1(unsigned x, unsigned y = 1) { dim3 d; d.x = x; d.y = y; return d; }
dim3 elementwise(size_t n) { return g1((unsigned)std::min<size_t>((n + 255) / 256, 1 << 20)); }
size_t chunk_rows(size_t rows) { return std::max<size_t>((rows + 1023) / 1024, 256); }

void test_layernorm(unsigned rows, unsigned C) {
    V x = rnd(rows * C, 1), w = rnd(C, 1.5), b = rnd(C, 1), dy = rnd(rows * C, 1), dw0 = rnd(C, 1), db0 = rnd(C, 1);
    for (auto& v : x) v += 3;
    V out(rows * C, NAN), mean(rows, NAN), rstd(rows, NAN);
    launch(g1(rows), g1(256), 0, layernorm_forward, out.data(), mean.data(), rstd.data(), (const float*)x.data(), (const float*)w.data(), (const float*)b.data(), rows, C);
    D wo(rows * C), wm(rows), wr(rows), wdx(rows * C), wdw(C), wdb(C);
    for (unsigned r = 0; r < rows; r++) {
        double m = 0, v = 0; for (unsigned c = 0; c < C; c++) m += x[r * C + c]; m /= C;
        for (unsigned c = 0; c < C; c++) v += (x[r * C + c] - m) * (x[r * C + c] - m); v /= C;
        double s = 1 / std::sqrt(v + 1e-5); wm[r] = m; wr[r] = s;
        double gm = 0, gnm = 0;
        for (unsigned c = 0; c < C; c++) { double n = (x[r * C + c] - m) * s; wo[r * C + c] = n * w[c] + b[c]; double g = dy[r * C + c] * w[c]; gm += g; gnm += g * n; }
        gm /= C; gnm /= C;
        for (unsigned c = 0; c < C; c++) { double n = (x[r * C + c] - m) * s; double g = dy[r * C + c] * w[c]; wdx[r * C + c] = s * (g - gm - n * gnm); wdw[c] += dy[r * C + c] * n; wdb[c] += dy[r * C + c]; }
    }
    char what[64]; snprintf(what, 64, "layernorm %ux%u", rows, C);
    check((std::string(what) + " out").c_str(), out, wo); check((std::string(what) + " mean").c_str(), mean, wm); check((std::string(what) + " rstd").c_str(), rstd, wr);
    V dx(rows * C, NAN), dw = dw0, db = db0;
    launch(g1(rows), g1(256), 0, layernorm_backward, dx.data(), (const float*)dy.data(), (const float*)x.data(), (const float*)w.data(), (const float*)mean.data(), (const float*)rstd.data(), rows, C);
    size_t per = chunk_rows(rows), chunks = (rows + per - 1) / per;
    V pw(chunks * C, 0), pb(chunks * C, 0);
    launch(g1((C + 31) / 32, chunks), g1(32, 8), 0, layernorm_param_partials, pw.data(), pb.data(), (const float*)dy.data(), (const float*)x.data(), (const float*)mean.data(), (const float*)rstd.data(), rows, C, (unsigned)per);
    launch(elementwise(C), g1(256), 0, column_sums_finish, dw.data(), (const float*)pw.data(), (unsigned)chunks, C);
    launch(elementwise(C), g1(256), 0, column_sums_finish, db.data(), (const float*)pb.data(), (unsigned)chunks, C);
    for (unsigned c = 0; c < C; c++) { wdw[c] += dw0[c]; wdb[c] += db0[c]; }
    check((std::string(what) + " dinp").c_str(), dx, wdx); check((std::string(what) + " dweight").c_str(), dw, wdw); check((std::string(what) + " dbias").c_str(), db, wdb);
}

void test_bias(unsigned rows, unsigned cols) {
    V d0 = rnd(cols, 1), dout = rnd(rows * cols, 1), db = d0;
    size_t per = chunk_rows(rows), chunks = (rows + per - 1) / per;
    V part(chunks * cols, 0);
    launch(g1((cols + 31) / 32, chunks), g1(32, 8), 0, column_partial_sums, part.data(), (const float*)dout.data(), rows, cols, (unsigned)per);
    launch(elementwise(cols), g1(256), 0, column_sums_finish, db.data(), (const float*)part.data(), (unsigned)chunks, cols);
    D want(cols); for (unsigned c = 0; c < cols; c++) { want[c] = d0[c]; for (unsigned r = 0; r < rows; r++) want[c] += dout[r * cols + c]; }
    char what[64]; snprintf(what, 64, "bias_backward %ux%u", rows, cols); check(what, db, want);
    // bias_rows with and without accumulation
    V out = rnd(rows * cols, 1), old = out; unsigned acc = 1; unsigned long long n = rows * cols;
    launch(elementwise(n), g1(256), 0, bias_rows, out.data(), (const float*)d0.data(), cols, acc, n);
    D w2(n); for (size_t i = 0; i < n; i++) w2[i] = old[i] + d0[i % cols];
    check("bias_rows accumulate", out, w2);
}

void test_ce(unsigned rows, unsigned V_) {
    V x = rnd(rows * V_, 4); for (unsigned i = (rows - 1) * V_; i < rows * V_; i++) x[i] += 80;
    std::vector<unsigned> tg(rows); for (auto& t : tg) t = rng() % V_;
    V loss(rows, NAN), d(rows * V_, NAN); float scale = 0.37f;
    launch(g1(rows), g1(256), 0, cross_entropy_forward, loss.data(), (const float*)x.data(), (const unsigned*)tg.data(), rows, V_);
    launch(g1(rows), g1(256), 0, cross_entropy_backward, d.data(), (const float*)x.data(), (const unsigned*)tg.data(), scale, rows, V_);
    D wl(rows), wd(rows * V_);
    for (unsigned r = 0; r < rows; r++) { double m = -1e300, s = 0; for (unsigned i = 0; i < V_; i++) m = std::max(m, (double)x[r * V_ + i]); for (unsigned i = 0; i < V_; i++) s += std::exp(x[r * V_ + i] - m);
        wl[r] = m + std::log(s) - x[r * V_ + tg[r]];
        for (unsigned i = 0; i < V_; i++) wd[r * V_ + i] = scale * (std::exp(x[r * V_ + i] - m) / s - (i == tg[r])); }
    char what[64]; snprintf(what, 64, "cross_entropy %ux%u", rows, V_); check(what, loss, wl); check((std::string(what) + " dlogits").c_str(), d, wd);
}

void test_embedding(unsigned B, unsigned T, unsigned C, unsigned vocab, unsigned P, unsigned start = 0) {
    std::vector<unsigned> tok(B * T); for (auto& t : tok) t = rng() % vocab;
    V wte = rnd(vocab * C, 1), wpe = rnd(P * C, 1), out(B * T * C, NAN), dout = rnd(B * T * C, 1), dwte = rnd(vocab * C, 1), dwpe = rnd(P * C, 1);
    V dwte0 = dwte, dwpe0 = dwpe; unsigned long long n = (unsigned long long)B * T * C;
    launch(elementwise(n), g1(256), 0, embedding_forward, out.data(), (const unsigned*)tok.data(), (const float*)wte.data(), (const float*)wpe.data(), T, start, C, vocab, n);
    D wo(n); for (size_t r = 0; r < B * T; r++) for (unsigned c = 0; c < C; c++) wo[r * C + c] = (double)wte[tok[r] * C + c] + wpe[(start + r % T) * C + c];
    char what[64]; snprintf(what, 64, "embedding b%u t%u c%u v%u from %u", B, T, C, vocab, start); check(what, out, wo);
    if (start > 0) return;
    launch(elementwise(T * C), g1(256), 0, embedding_backward_wpe, dwpe.data(), (const float*)dout.data(), B, T, C);
    // groups as the host builds them
    std::vector<unsigned> order(B * T); for (unsigned i = 0; i < B * T; i++) order[i] = i;
    std::stable_sort(order.begin(), order.end(), [&](unsigned a, unsigned b) { return tok[a] < tok[b]; });
    std::vector<unsigned> gt, st; for (unsigned i = 0; i < order.size(); i++) if (gt.empty() || gt.back() != tok[order[i]]) { gt.push_back(tok[order[i]]); st.push_back(i); }
    st.push_back(B * T); unsigned groups = gt.size();
    std::vector<unsigned> table = gt; table.insert(table.end(), st.begin(), st.end()); table.insert(table.end(), order.begin(), order.end());
    unsigned bpg = (C + 255) / 256;
    launch(g1(groups * bpg), g1(256), 0, embedding_backward_wte, dwte.data(), (const float*)dout.data(), (const unsigned*)table.data(), groups, C);
    D wwte(dwte0.begin(), dwte0.end()), wwpe(dwpe0.begin(), dwpe0.end());
    for (size_t r = 0; r < B * T; r++) for (unsigned c = 0; c < C; c++) { wwte[tok[r] * C + c] += dout[r * C + c]; wwpe[(r % T) * C + c] += dout[r * C + c]; }
    check((std::string(what) + " dwte").c_str(), dwte, wwte); check((std::string(what) + " dwpe").c_str(), dwpe, wwpe);
}

void test_elementwise() {
    unsigned long long n = 70001; V x = rnd(n, 6), dy = rnd(n, 1), o(n, NAN), d(n, NAN);
    launch(elementwise(n), g1(256), 0, gelu_forward, o.data(), (const float*)x.data(), n);
    launch(elementwise(n), g1(256), 0, gelu_backward, d.data(), (const float*)x.data(), (const float*)dy.data(), n);
    D wo(n), wd(n); const double S = 0.7978845608028654, K = 0.044715;
    for (size_t i = 0; i < n; i++) { double v = x[i], u = S * (v + K * v * v * v), th = std::tanh(u); wo[i] = 0.5 * v * (1 + th); wd[i] = (0.5 * (1 + th) + 0.5 * v * (1 - th * th) * S * (1 + 3 * K * v * v)) * dy[i]; }
    check("gelu", o, wo); check("gelu backward", d, wd);
    V p = rnd(4099, 1), g = rnd(4099, 1), m = rnd(4099, 0.1), v = rnd(4099, 0.1); for (auto& e : v) e *= e;
    V p0 = p, m0 = m, v0 = v; unsigned step = 5; float lr = 3e-3f, b1 = 0.9f, b2 = 0.95f, eps = 1e-8f, wd_ = 0.1f;
    float bc1 = 1 - std::pow((double)b1, step), bc2 = 1 - std::pow((double)b2, step); unsigned long long nn = 4099;
    float gs = 0.625f;
    launch(elementwise(nn), g1(256), 0, adamw, p.data(), (const float*)g.data(), m.data(), v.data(), lr, b1, b2, eps, wd_, bc1, bc2, gs, nn);
    D wp(nn), wm(nn), wv(nn);
    for (size_t i = 0; i < nn; i++) { double gi = (double)g[i] * gs, mn = (double)b1 * m0[i] + (1 - (double)b1) * gi, vn = (double)b2 * v0[i] + (1 - (double)b2) * gi * gi;
        double c1 = 1 - std::pow((double)b1, step), c2 = 1 - std::pow((double)b2, step);
        wp[i] = p0[i] - (double)lr * ((mn / c1) / (std::sqrt(vn / c2) + eps) + wd_ * (double)p0[i]); wm[i] = mn; wv[i] = vn; }
    check("adamw param", p, wp); check("adamw m", m, wm); check("adamw v", v, wv);
    V a = rnd(257, 2), b = rnd(257, 2), s(257, NAN); unsigned long long k = 257; float val = 0.25f;
    launch(elementwise(k), g1(256), 0, add_f32, s.data(), (const float*)a.data(), (const float*)b.data(), k);
    D ws(257); for (int i = 0; i < 257; i++) ws[i] = (double)a[i] + b[i]; check("add", s, ws);
    launch(elementwise(k), g1(256), 0, add_assign_f32, a.data(), (const float*)b.data(), k); check("add_assign", a, ws);
    launch(elementwise(k), g1(256), 0, fill_f32, s.data(), val, k); check("fill", s, D(257, 0.25));
    // Sums of squares into slot 1 of 3: one block, several, and more elements than threads.
    for (unsigned long long len : {1ull, 300ull, 70001ull}) {
        V x = rnd(len, 3), out(3, 7.0f);
        unsigned blocks = (unsigned)std::min<unsigned long long>((len + 255) / 256, 16);
        V partial(blocks, NAN);
        launch(g1(blocks), g1(256), 0, sum_squares_partial, partial.data(), (const float*)x.data(), len);
        launch(elementwise(1), g1(256), 0, sum_squares_finish, out.data(), (const float*)partial.data(), blocks, 1ull);
        double want = 0; for (float xi : x) want += (double)xi * xi;
        check("sum_squares", out, D{7.0, want, 7.0});
    }
}

#include "bf16_checks.inc"
#include "attention_checks.inc"
#include "flash_checks.inc"
#include "llama_checks.inc"
int main() {
    test_bf16();
    test_elementwise();
    for (auto [r, c] : std::vector<std::pair<unsigned, unsigned>>{{1, 1}, {1, 7}, {5, 48}, {33, 257}, {3, 1537}, {300, 16}}) test_layernorm(r, c);
    for (auto [r, c] : std::vector<std::pair<unsigned, unsigned>>{{1, 1}, {7, 13}, {300, 257}, {1030, 3}}) test_bias(r, c);
    for (auto [B, T, C, NH] : std::vector<std::tuple<unsigned, unsigned, unsigned, unsigned>>{{1, 1, 8, 2}, {2, 5, 12, 3}, {1, 17, 48, 4}, {1, 300, 16, 2}, {3, 33, 64, 1}}) attention<float>(B, T, C, NH, 1e-4, "f32");
    for (auto [B, T, C, NH] : std::vector<std::tuple<unsigned, unsigned, unsigned, unsigned>>{{2, 5, 12, 3}, {1, 300, 16, 2}, {3, 33, 64, 1}}) attention<bf16>(B, T, C, NH, 1e-2, "bf16");
    for (auto [B, T, C, NH] : std::vector<std::tuple<unsigned, unsigned, unsigned, unsigned>>{{2, 5, 32, 2}, {1, 130, 64, 2}, {2, 70, 128, 2}, {1, 67, 128, 1}, {1, 64, 64, 4}}) flash(B, T, C, NH);
    test_llama_kernels();
    test_ce(1, 1); test_ce(1, 2); test_ce(3, 131); test_ce(2, 1031); test_ce(3, 50257);
    test_embedding(1, 1, 1, 1, 1); test_embedding(2, 7, 13, 131, 9); test_embedding(3, 300, 20, 257, 300); test_embedding(4, 65, 64, 5, 70); test_embedding(1, 3, 600, 4, 3); test_embedding(2, 1, 13, 131, 9, 8); test_embedding(1, 4, 20, 7, 30, 11);
    for (auto [B, T, C, NH, past] : std::vector<std::tuple<unsigned, unsigned, unsigned, unsigned, unsigned>>{{1, 1, 8, 2, 0}, {2, 9, 12, 3, 8}, {1, 300, 16, 2, 290}, {2, 40, 64, 1, 13}, {1, 20, 48, 4, 0}, {1, 5, 600, 2, 2}}) decode(B, T, C, NH, past);
    printf("%d failures\n", failures);
    return failures != 0;
}
