// Chunk-parallel RWKV-5/6 WKV: the same op as wkv56_kernels.cuh, but parallel over chunks of C = 16 tokens as
// well as over heads, so a long sequence with few heads still fills the GPU. Included after wkv56_kernels.cuh
// (it reuses kTimeDecay, cptr and mptr). The math, mirrored in float64 and checked against autograd, is
// tests/test_wkv56_chunk_math.py. With lw = -exp(w) the log-decay and Bx_t = sum_{s<t} lw_s inside a chunk:
//   forward   dS_c = sum_s v_s (k_s e^{Bt - Bx_{s+1}})^T           (chunk_outer, every chunk at once)
//             S_{c+1} = S_c diag(e^{Bt}) + dS_c                     (scan, sequential over chunks, per element)
//             y_t = S_c (r_t e^{Bx_t}) + sum_{s<=t} A[t,s] v_s      (chunk_output)
//   backward  the same three passes on dy: dS_end flows back by the reverse scan, then chunk_grads (which reuses
//             the forward's pair scores A).
// Every exponent is <= 0 (pairwise factors e^{Bx_t - Bx_{s+1}}, s < t), so no decay can overflow; all math is fp32
// (the log-decay is floored at kMinLogDecay).
// Everything has internal linkage (anonymous namespace): wkv5 and wkv6 instantiate the same names with different
// kTimeDecay, and must never bind to each other's launchers.
namespace {
namespace wkv56c {

constexpr int C = wkv::CK;      // tokens per chunk (the binding sizes the workspaces by CK)
constexpr int N = WKV_N;        // head size
constexpr int kThreads = 256;   // 4 groups of N threads
constexpr int kGroups = kThreads / N;
constexpr int SP = N + 4;       // padded row stride of an N x N tile in shared memory (float4 rows, no bank clash)
constexpr int kScanUnroll = 8;  // chunks whose loads the scan issues before it uses them
// Floor of the per-token log-decay: a decay below e^-22 (~3e-10, far below fp32's resolution of the state) acts as
// e^-22. It keeps w > 88.7 (where -exp(w) is -inf) from turning the prefix sums into inf - inf = NaN, and keeps them
// small: a floored token's log2-decay (-31.7) stays below 32 in magnitude, where fp32's spacing is 2e-6, so the
// differences of two prefix sums after it stay exact to ~1e-6. At -60 (-86.6 in base 2, spacing 8e-6) the H200 missed
// the 1e-5 contract (1.8e-5, test_chunked_kernel_floored_decay, 2026-12-01). Exact above the floor; below it dw is 0.
constexpr float kMinLogDecay = -22.f;
static_assert(N == 64 && C % kGroups == 0, "the chunked RWKV-5/6 kernels are built for head size 64");
static_assert(C * C == kThreads, "one pair score per thread when the scores are saved and reloaded");

struct Chunk {
  int b, h, c, t0, L;  // batch, head, chunk, first token, tokens in this chunk (< C only at the end)
  __device__ Chunk(int T, int H) : b(blockIdx.y / H), h(blockIdx.y % H), c(blockIdx.x), t0(blockIdx.x * C),
                                   L(min(C, T - blockIdx.x * C)) {}
};

// 16 bytes of F at p (4 floats or 8 bf16) -> out[0 .. 16/sizeof(F)).
__device__ __forceinline__ void load16(const float* p, float* out) {
  const float4 v = *reinterpret_cast<const float4*>(p);
  out[0] = v.x, out[1] = v.y, out[2] = v.z, out[3] = v.w;
}
__device__ __forceinline__ void load16(const __nv_bfloat16* p, float* out) {
  const uint4 v = *reinterpret_cast<const uint4*>(p);
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
  for (int n = 0; n < 4; ++n) {
    const float2 f = __bfloat1622float2(h[n]);
    out[2 * n] = f.x, out[2 * n + 1] = f.y;
  }
}

// dst[l][x] = src[b, t0 + l, h, x] as float, 0 past the end of the sequence; 16-byte loads (the binding checks
// the alignment).
template <typename F>
__device__ __forceinline__ void load_rows(float (*dst)[N], const F* src, const Chunk& q, int T, int H) {
  constexpr int V = 16 / sizeof(F);
  for (int e = threadIdx.x * V; e < C * N; e += kThreads * V) {
    const int l = e / N, x = e % N;
    float f[V];
    if (l < q.L) load16(src + wkv::seq_off(q.b, q.t0 + l, q.h, T, H, N) + x, f);
    else
#pragma unroll
      for (int n = 0; n < V; ++n) f[n] = 0.f;
#pragma unroll
    for (int n = 0; n < V; n += 4)
      *reinterpret_cast<float4*>(&dst[l][x + n]) = make_float4(f[n], f[n + 1], f[n + 2], f[n + 3]);
  }
}

// lw[l][x] = max(-exp(w), kMinLogDecay) for the chunk's tokens (wkv6: w per token; wkv5: w[h] for every token),
// 0 past the end.
template <typename F>
__device__ __forceinline__ void load_log_decay(float (*lw)[N], const F* w, const Chunk& q, int T, int H) {
  for (int e = threadIdx.x; e < C * N; e += kThreads) {
    const int l = e / N, x = e % N;
    const int64_t at = kTimeDecay ? wkv::seq_off(q.b, q.t0 + l, q.h, T, H, N) + x : int64_t(q.h) * N + x;
    lw[l][x] = l < q.L ? fmaxf(-expf(wkv::to_f(w[at])), kMinLogDecay) : 0.f;
  }
}

// Bx[t][x] = log2(e) * sum_{s<t} lw[s][x] for t = 0..C (base-2 units: every decay factor is one exp2f);
// call with every thread, ends with a barrier.
__device__ __forceinline__ void prefix_decay(const float (*lw)[N], float (*Bx)[N]) {
  if (threadIdx.x < N) {
    float acc = 0.f;
    Bx[0][threadIdx.x] = 0.f;
#pragma unroll
    for (int l = 0; l < C; ++l) Bx[l + 1][threadIdx.x] = acc += lw[l][threadIdx.x] * 1.4426950408889634f;
  }
  __syncthreads();
}

// An N x N fp32 tile (row-major, [value][key]) from global memory into the padded shared tile; coalesced float4.
__device__ __forceinline__ void load_tile(float (*dst)[SP], const float* src) {
  for (int f = threadIdx.x; f < N * N / 4; f += kThreads) {
    const int row = f / (N / 4), col = (f % (N / 4)) * 4;
    *reinterpret_cast<float4*>(&dst[row][col]) = reinterpret_cast<const float4*>(src)[f];
  }
}

__device__ __forceinline__ float dot4(float4 a, float4 b) { return a.x * b.x + a.y * b.y + a.z * b.z + a.w * b.w; }

// The chunk's pair scores A[t][s] = sum_j r_t k_s e^{Bx_t - Bx_{s+1}} (s < t), A[t][t] = sum_j u r_t k_t, 0 above
// the diagonal (every entry is saved for the backward): one warp per pair, two keys per lane. Ends with a barrier.
__device__ __forceinline__ void pair_scores(const float (*r)[N], const float (*k)[N], const float (*Bx)[N], float u0,
                                            float u1, float (*A)[C]) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, j0 = lane, j1 = lane + 32;
  for (int p = warp; p < C * C; p += kThreads / 32) {
    const int t = p / C, s = p % C;
    if (s > t) {  // warp-uniform
      if (lane == 0) A[t][s] = 0.f;
      continue;
    }
    float a;
    if (s < t)
      a = r[t][j0] * k[s][j0] * exp2f(Bx[t][j0] - Bx[s + 1][j0]) +
          r[t][j1] * k[s][j1] * exp2f(Bx[t][j1] - Bx[s + 1][j1]);
    else
      a = u0 * r[t][j0] * k[t][j0] + u1 * r[t][j1] * k[t][j1];
    a = wkv::group_sum<32>(a);
    if (lane == 0) A[t][s] = a;
  }
  __syncthreads();
}

// G[t][s] = dy_t . v_s for s <= t, one warp per pair. Ends with a barrier.
__device__ __forceinline__ void pair_dots(const float (*dy)[N], const float (*v)[N], float (*G)[C]) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int p = warp; p < C * C; p += kThreads / 32) {
    const int t = p / C, s = p % C;
    if (s > t) continue;
    const float g = wkv::group_sum<32>(dy[t][lane] * v[s][lane] + dy[t][lane + 32] * v[s][lane + 32]);
    if (lane == 0) G[t][s] = g;
  }
  __syncthreads();
}

// Where chunk c's tile sits in a workspace: the backward's in reverse chunk order, so that its scan, which runs from
// the last chunk to the first, walks memory upwards like the forward's (measured on the H200: a scan walking down
// took 1.28 ms against 0.30 ms up, same bytes).
template <bool kReverse>
__device__ __forceinline__ int slot(int c, int nc) { return kReverse ? nc - 1 - c : c; }

// out[bh][slot(c)] = sum_l P[l] Q[l]^T (N x N): the chunk's own state contribution (forward: P = v,
// Q = k e^{Bt-Bx_{l+1}}, and the chunk's total decay e^{Bt}) or its own part of the state gradient (backward:
// P = dy, Q = r e^{Bx_l}). Bx is in base-2 units here (see prefix_decay).
template <typename F, bool kGrad>
__global__ void __launch_bounds__(kThreads) chunk_outer(int T, int H, const F* __restrict__ p_src,
    const F* __restrict__ q_src, const F* __restrict__ w, float* __restrict__ out, float* __restrict__ decay) {
  __shared__ __align__(16) float P[C][N];
  __shared__ __align__(16) float Q[C][N];
  __shared__ float lw[C][N], Bx[C + 1][N];
  const Chunk q(T, H);
  const int nc = gridDim.x;
  load_rows(P, p_src, q, T, H);
  load_rows(Q, q_src, q, T, H);
  load_log_decay(lw, w, q, T, H);
  __syncthreads();
  prefix_decay(lw, Bx);
  for (int e = threadIdx.x; e < C * N; e += kThreads) {
    const int l = e / N, x = e % N;
    Q[l][x] *= exp2f(kGrad ? Bx[l][x] : Bx[C][x] - Bx[l + 1][x]);
  }
  if (!kGrad && threadIdx.x < N)
    decay[(int64_t(blockIdx.y) * nc + q.c) * N + threadIdx.x] = exp2f(Bx[C][threadIdx.x]);
  __syncthreads();
  const int i0 = (threadIdx.x / 16) * 4, j0 = (threadIdx.x % 16) * 4;  // a 4 x 4 register tile per thread
  float acc[4][4] = {};
#pragma unroll
  for (int l = 0; l < C; ++l) {
    const float4 pv = *reinterpret_cast<const float4*>(&P[l][i0]), qv = *reinterpret_cast<const float4*>(&Q[l][j0]);
    const float pi[4] = {pv.x, pv.y, pv.z, pv.w}, qj[4] = {qv.x, qv.y, qv.z, qv.w};
#pragma unroll
    for (int a = 0; a < 4; ++a)
#pragma unroll
      for (int b = 0; b < 4; ++b) acc[a][b] += pi[a] * qj[b];
  }
  float* dst = out + (int64_t(blockIdx.y) * nc + slot<kGrad>(q.c, nc)) * N * N;
#pragma unroll
  for (int a = 0; a < 4; ++a)
    *reinterpret_cast<float4*>(&dst[(i0 + a) * N + j0]) = make_float4(acc[a][0], acc[a][1], acc[a][2], acc[a][3]);
}

// Per state element, over the chunks in order (forward) or reversed (backward): X <- X diag(decay_c) + inc_c,
// where inc_c is read from ws and replaced by the X it meets (the chunk's start state / end-state gradient).
// Workspace slots are visited upwards either way (see slot()).
template <bool kReverse>
__global__ void __launch_bounds__(kThreads) scan_chunks(int nc, float* __restrict__ ws, const float* __restrict__ decay,
                                                         const float* __restrict__ init, float* __restrict__ final_) {
  const int bh = blockIdx.y, e = blockIdx.x * kThreads + threadIdx.x, j = e % N;
  float* x = ws + int64_t(bh) * nc * N * N + e;
  const float* d = decay + int64_t(bh) * nc * N + j;
  float X = init[int64_t(bh) * N * N + e];
  for (int s0 = 0; s0 < nc; s0 += kScanUnroll) {
    float inc[kScanUnroll], dc[kScanUnroll];
#pragma unroll
    for (int n = 0; n < kScanUnroll; ++n) {
      const bool in = s0 + n < nc;
      inc[n] = in ? x[int64_t(s0 + n) * N * N] : 0.f;
      dc[n] = in ? d[int64_t(slot<kReverse>(s0 + n, nc)) * N] : 1.f;
    }
#pragma unroll
    for (int n = 0; n < kScanUnroll; ++n) {
      if (s0 + n >= nc) break;
      x[int64_t(s0 + n) * N * N] = X;
      X = X * dc[n] + inc[n];
    }
  }
  final_[int64_t(bh) * N * N + e] = X;
}

struct OutputSmem {
  float S[N][SP];
  float r[C][N], k[C][N], v[C][N], rt[C][N], lw[C][N], Bx[C + 1][N], A[C][C];
};

// y of one chunk from its start state (states[bh][c]) and its own tokens; keeps the pair scores for the backward
// (scores[bh][c], C x C, zero above the diagonal).
template <typename F>
__global__ void __launch_bounds__(kThreads) chunk_output(int T, int H, const F* __restrict__ r_,
    const F* __restrict__ w_, const F* __restrict__ k_, const F* __restrict__ v_, const F* __restrict__ u_,
    const float* __restrict__ states, F* __restrict__ y, float* __restrict__ scores) {
  extern __shared__ float4 smem_raw[];
  OutputSmem& sm = *reinterpret_cast<OutputSmem*>(smem_raw);
  const Chunk q(T, H);
  load_rows(sm.r, r_, q, T, H);
  load_rows(sm.k, k_, q, T, H);
  load_rows(sm.v, v_, q, T, H);
  load_log_decay(sm.lw, w_, q, T, H);
  load_tile(sm.S, states + (int64_t(blockIdx.y) * gridDim.x + q.c) * N * N);
  __syncthreads();
  prefix_decay(sm.lw, sm.Bx);
  for (int e = threadIdx.x; e < C * N; e += kThreads)
    sm.rt[e / N][e % N] = sm.r[e / N][e % N] * exp2f(sm.Bx[e / N][e % N]);
  const float u0 = wkv::to_f(u_[q.h * N + threadIdx.x % 32]), u1 = wkv::to_f(u_[q.h * N + threadIdx.x % 32 + 32]);
  pair_scores(sm.r, sm.k, sm.Bx, u0, u1, sm.A);
  scores[(int64_t(blockIdx.y) * gridDim.x + q.c) * C * C + threadIdx.x] = sm.A[threadIdx.x / C][threadIdx.x % C];

  const int i = threadIdx.x % N, g = threadIdx.x / N;  // value row i, tokens g, g + 4, ...
  constexpr int Q = C / kGroups;
  float acc[Q] = {};
  for (int j = 0; j < N; j += 4) {
    const float4 s = *reinterpret_cast<const float4*>(&sm.S[i][j]);
#pragma unroll
    for (int n = 0; n < Q; ++n) acc[n] += dot4(s, *reinterpret_cast<const float4*>(&sm.rt[g + n * kGroups][j]));
  }
#pragma unroll
  for (int n = 0; n < Q; ++n) {
    const int t = g + n * kGroups;
    for (int s = 0; s <= t; ++s) acc[n] += sm.A[t][s] * sm.v[s][i];
    if (t < q.L) y[wkv::seq_off(q.b, q.t0 + t, q.h, T, H, N) + i] = wkv::from_f<F>(acc[n]);
  }
}

struct GradSmem {
  float S[N][SP];                                   // dS at the chunk's end, then S at its start, then pair sums
  float r[C][N], k[C][N], dy[C][N], lw[C][N];
  float v_or_r_in[C][N];   // v, then r_t e^{Bx_t} (S^T dy_t) once the dk pass is done
  float kt_or_k_end[C][N]; // k_s e^{Bt - Bx_{s+1}}, then k_s e^{Bt - Bx_{s+1}} (dS_end^T v_s) once dv is done
  float Bx[C + 1][N], A[C][C], G[C][C], part[kGroups][N];
};
static_assert(sizeof(float) * kGroups * C * N <= sizeof(float) * N * SP, "pair sums must fit in the state tile");

// 4 x 4 block of sums: out[n] += sum_i S[i][x] * rows[g + 4n][i] (S column x against four token rows).
__device__ __forceinline__ void column_dots(const float (*S)[SP], const float (*rows)[N], int x, int g, float* out) {
  for (int i = 0; i < N; i += 4) {
    const float s0 = S[i][x], s1 = S[i + 1][x], s2 = S[i + 2][x], s3 = S[i + 3][x];
#pragma unroll
    for (int n = 0; n < C / kGroups; ++n) {
      const float4 q = *reinterpret_cast<const float4*>(&rows[g + n * kGroups][i]);
      out[n] += s0 * q.x + s1 * q.y + s2 * q.z + s3 * q.w;
    }
  }
}

// Every input gradient of one chunk from its start state and end-state gradient (dS_end). The log-decay gradient
// is summed from terms that each carry their own decay, so a decay near 0 gives a gradient near 0 without
// cancellation: dlw_s = sum_{t>s} r_t e^{Bx_t} (S^T dy_t) + sum_{s'<s} k_s' e^{Bt-Bx_{s'+1}} (dS_end^T v_s')
//                      + e^{Bt} sum_i S dS_end + sum_{t>s>s'} G[t,s'] r_t k_s' e^{Bx_t-Bx_{s'+1}}.
// du and wkv5's dw_head get this chunk's share only, [B,H,nc,N].
template <typename F>
__global__ void __launch_bounds__(kThreads) chunk_grads(int T, int H, const F* __restrict__ r_,
    const F* __restrict__ w_, const F* __restrict__ k_, const F* __restrict__ v_, const F* __restrict__ u_,
    const F* __restrict__ dy_, const float* __restrict__ states, const float* __restrict__ scores,
    const float* __restrict__ dstates,
    F* __restrict__ dr, F* __restrict__ dw, F* __restrict__ dk, F* __restrict__ dv, float* __restrict__ du,
    float* __restrict__ dw_head) {
  extern __shared__ float4 smem_raw[];
  GradSmem& sm = *reinterpret_cast<GradSmem*>(smem_raw);
  const Chunk q(T, H);
  const int nc = gridDim.x, bh = blockIdx.y;
  const int64_t tile = (int64_t(bh) * nc + q.c) * N * N;
  load_rows(sm.r, r_, q, T, H);
  load_rows(sm.k, k_, q, T, H);
  float (*v)[N] = sm.v_or_r_in, (*kt)[N] = sm.kt_or_k_end;
  load_rows(v, v_, q, T, H);
  load_rows(sm.dy, dy_, q, T, H);
  load_log_decay(sm.lw, w_, q, T, H);
  sm.A[threadIdx.x / C][threadIdx.x % C] = scores[(int64_t(bh) * nc + q.c) * C * C + threadIdx.x];
  load_tile(sm.S, dstates + (int64_t(bh) * nc + slot<true>(q.c, nc)) * N * N);
  __syncthreads();
  prefix_decay(sm.lw, sm.Bx);
  for (int e = threadIdx.x; e < C * N; e += kThreads) {
    const int l = e / N, x = e % N;
    kt[l][x] = sm.k[l][x] * exp2f(sm.Bx[C][x] - sm.Bx[l + 1][x]);
  }
  const int x = threadIdx.x % N, g = threadIdx.x / N;  // feature x (value row or key), tokens g, g + 4, ...
  const float ux = wkv::to_f(u_[q.h * N + x]);
  pair_dots(sm.dy, v, sm.G);
  constexpr int Q = C / kGroups;

  // dv_s = sum_{t>=s} A[t,s] dy_t + dS_end kt_s  (x = value row)
  float acc[Q] = {};
  for (int j = 0; j < N; j += 4) {
    const float4 s = *reinterpret_cast<const float4*>(&sm.S[x][j]);
#pragma unroll
    for (int n = 0; n < Q; ++n) acc[n] += dot4(s, *reinterpret_cast<const float4*>(&kt[g + n * kGroups][j]));
  }
#pragma unroll
  for (int n = 0; n < Q; ++n) {
    const int s = g + n * kGroups;
    for (int t = s; t < C; ++t) acc[n] += sm.A[t][s] * sm.dy[t][x];
    if (s < q.L) dv[wkv::seq_off(q.b, q.t0 + s, q.h, T, H, N) + x] = wkv::from_f<F>(acc[n]);
  }
  __syncthreads();  // kt is read by every thread above; it becomes k_end below

  // dk_s = e^{Bt - Bx_{s+1}} dS_end^T v_s + sum_{t>s} G[t,s] r_t e^{Bx_t - Bx_{s+1}} + bonus  (x = key)
  float end[Q] = {};
  column_dots(sm.S, v, x, g, end);
#pragma unroll
  for (int n = 0; n < Q; ++n) {
    const int s = g + n * kGroups;
    float f = end[n] * exp2f(sm.Bx[C][x] - sm.Bx[s + 1][x]);
    kt[s][x] = sm.k[s][x] * f;  // k_end
    for (int t = s + 1; t < C; ++t) f += sm.G[t][s] * sm.r[t][x] * exp2f(sm.Bx[t][x] - sm.Bx[s + 1][x]);
    if (s < q.L) dk[wkv::seq_off(q.b, q.t0 + s, q.h, T, H, N) + x] = wkv::from_f<F>(f + ux * sm.r[s][x] * sm.G[s][s]);
  }
  __syncthreads();
  load_tile(sm.S, states + tile);
  __syncthreads();

  // dr_t = e^{Bx_t} S^T dy_t + sum_{s<t} G[t,s] k_s e^{Bx_t - Bx_{s+1}} + bonus  (x = key); e^{Bt} sum_i S dS_end
  float in[Q] = {};
  column_dots(sm.S, sm.dy, x, g, in);
#pragma unroll
  for (int n = 0; n < Q; ++n) {
    const int t = g + n * kGroups;
    float f = in[n] * exp2f(sm.Bx[t][x]);
    v[t][x] = sm.r[t][x] * f;  // r_in (v is no longer read: the barrier before the state reload)
    for (int s = 0; s < t; ++s) f += sm.G[t][s] * sm.k[s][x] * exp2f(sm.Bx[t][x] - sm.Bx[s + 1][x]);
    if (t < q.L) dr[wkv::seq_off(q.b, q.t0 + t, q.h, T, H, N) + x] = wkv::from_f<F>(f + ux * sm.k[t][x] * sm.G[t][t]);
  }
  {
    const float* dS_end = dstates + (int64_t(bh) * nc + slot<true>(q.c, nc)) * N * N;
    float p = 0.f;
    for (int i = g * (N / kGroups); i < (g + 1) * (N / kGroups); ++i) p += sm.S[i][x] * dS_end[i * N + x];
    sm.part[g][x] = p;
  }
  __syncthreads();

  // pairs[g][s][x] = sum over this group's t > s of sum_{s'<s} G[t,s'] r_t k_s' e^{Bx_t - Bx_{s'+1}}
  float (*pairs)[C][N] = reinterpret_cast<float (*)[C][N]>(&sm.S[0][0]);
  {
    float straddle[C] = {};
#pragma unroll
    for (int n = 0; n < Q; ++n) {
      const int t = g + n * kGroups;
      const float rt = sm.r[t][x], bt = sm.Bx[t][x];
      float prefix = 0.f;
#pragma unroll
      for (int s = 1; s < C; ++s)
        if (s < t) {
          prefix += sm.G[t][s - 1] * sm.k[s - 1][x] * exp2f(bt - sm.Bx[s][x]);
          straddle[s] += rt * prefix;
        }
    }
#pragma unroll
    for (int s = 0; s < C; ++s) pairs[g][s][x] = straddle[s];
  }
  __syncthreads();

  if (threadIdx.x < N) {  // dw (wkv6 per token, wkv5 per (b,h)) and du, x = key
    float before[C], run = 0.f;
#pragma unroll
    for (int s = 0; s < C; ++s) before[s] = run, run += kt[s][x];  // k_end
    float whole = 0.f;
    for (int p = 0; p < kGroups; ++p) whole += sm.part[p][x];
    whole *= exp2f(sm.Bx[C][x]);
    float after = 0.f, head_w = 0.f, acc_u = 0.f;
#pragma unroll
    for (int s = C - 1; s >= 0; --s) {
      float dlw = after + before[s] + whole;
      for (int p = 0; p < kGroups; ++p) dlw += pairs[p][s][x];
      const float dws = sm.lw[s][x] > kMinLogDecay ? dlw * sm.lw[s][x] : 0.f;  // d lw / d w = lw above the floor
      if (kTimeDecay && s < q.L) dw[wkv::seq_off(q.b, q.t0 + s, q.h, T, H, N) + x] = wkv::from_f<F>(dws);
      head_w += dws;
      acc_u += sm.r[s][x] * sm.k[s][x] * sm.G[s][s];
      after += v[s][x];  // r_in
    }
    const int64_t part = (int64_t(bh) * nc + q.c) * N + x;  // this chunk's share; summed over chunks by the host
    du[part] = acc_u;
    if (!kTimeDecay) dw_head[part] = head_w;
  }
}

inline dim3 chunk_grid(int T, int BH) { return dim3((T + C - 1) / C, BH); }

// The state pass both directions share: every chunk's own outer product P Q^T into ws (and, in the forward, the
// chunk decays), then the scan over chunks from init, which leaves each chunk's start state (forward) or end-state
// gradient (backward) in ws and the last one in final_.
template <typename F, bool kGrad>
void state_pass(int B, int T, int H, const F* p_src, const F* q_src, const F* w, torch::Tensor ws,
                torch::Tensor decay, torch::Tensor init, torch::Tensor final_) {
  const auto stream = c10::cuda::getCurrentCUDAStream();
  chunk_outer<F, kGrad><<<chunk_grid(T, B * H), kThreads, 0, stream>>>(T, H, p_src, q_src, w, ws.data_ptr<float>(),
                                                                       kGrad ? nullptr : decay.data_ptr<float>());
  WKV_LAUNCH_CHECK();
  scan_chunks<kGrad><<<dim3(N * N / kThreads, B * H), kThreads, 0, stream>>>((T + C - 1) / C, ws.data_ptr<float>(),
      decay.data_ptr<float>(), init.data_ptr<float>(), final_.data_ptr<float>());
  WKV_LAUNCH_CHECK();
}

template <typename F>
void forward(torch::Tensor r, torch::Tensor w, torch::Tensor k, torch::Tensor v, torch::Tensor u, torch::Tensor s0,
             torch::Tensor y, torch::Tensor sT, torch::Tensor states, torch::Tensor decay, torch::Tensor scores) {
  const int B = r.size(0), T = r.size(1), H = r.size(2);
  state_pass<F, false>(B, T, H, cptr<F>(v), cptr<F>(k), cptr<F>(w), states, decay, s0, sT);
  auto out = chunk_output<F>;
  wkv::allow_smem(out, sizeof(OutputSmem));
  out<<<chunk_grid(T, B * H), kThreads, sizeof(OutputSmem), c10::cuda::getCurrentCUDAStream()>>>(T, H, cptr<F>(r),
      cptr<F>(w), cptr<F>(k), cptr<F>(v), cptr<F>(u), states.data_ptr<float>(), mptr<F>(y), scores.data_ptr<float>());
  WKV_LAUNCH_CHECK();
}

// dw: [B,T,H,N] of the input dtype (wkv6) or fp32 [B,H,N] per-(b,h) sums (wkv5); du: fp32 [B,H,N];
// dstates: fp32 workspace shaped like states. The per-(b,h) sums come from per-chunk shares summed in a fixed order
// (no atomics), so they are the same bits on every run.
template <typename F>
void backward(torch::Tensor r, torch::Tensor w, torch::Tensor k, torch::Tensor v, torch::Tensor u, torch::Tensor dy,
              torch::Tensor dsT, torch::Tensor states, torch::Tensor decay, torch::Tensor scores, torch::Tensor dstates,
              torch::Tensor dr, torch::Tensor dw, torch::Tensor dk, torch::Tensor dv, torch::Tensor du,
              torch::Tensor ds0) {
  const int B = r.size(0), T = r.size(1), H = r.size(2), nc = (T + C - 1) / C;
  auto du_parts = torch::empty({B, H, nc, N}, du.options());
  auto dw_parts = kTimeDecay ? torch::Tensor() : torch::empty({B, H, nc, N}, du.options());
  state_pass<F, true>(B, T, H, cptr<F>(dy), cptr<F>(r), cptr<F>(w), dstates, decay, dsT, ds0);
  auto grads = chunk_grads<F>;
  wkv::allow_smem(grads, sizeof(GradSmem));
  grads<<<chunk_grid(T, B * H), kThreads, sizeof(GradSmem), c10::cuda::getCurrentCUDAStream()>>>(T, H, cptr<F>(r),
      cptr<F>(w), cptr<F>(k), cptr<F>(v), cptr<F>(u), cptr<F>(dy), states.data_ptr<float>(), scores.data_ptr<float>(),
      dstates.data_ptr<float>(), mptr<F>(dr), kTimeDecay ? mptr<F>(dw) : nullptr, mptr<F>(dk), mptr<F>(dv),
      du_parts.data_ptr<float>(), kTimeDecay ? nullptr : dw_parts.data_ptr<float>());
  WKV_LAUNCH_CHECK();
  du.copy_(du_parts.sum(2));
  if (!kTimeDecay) dw.copy_(dw_parts.sum(2));
}

}  // namespace wkv56c
}  // namespace

// Entry points of the chunked kernels with the version in the name, defined once per including .cu file.
#define WKV56_DEFINE_CHUNKED_ENTRY_POINTS(FWD_NAME, BWD_NAME)                                                      \
  void FWD_NAME(torch::Tensor r, torch::Tensor w, torch::Tensor k, torch::Tensor v, torch::Tensor u,               \
                torch::Tensor s0, torch::Tensor y, torch::Tensor sT, torch::Tensor states, torch::Tensor decay,    \
                torch::Tensor scores) {                                                                            \
    wkv::with_element(r, [&](auto e) {                                                                             \
      wkv56c::forward<decltype(e)>(r, w, k, v, u, s0, y, sT, states, decay, scores);                               \
    });                                                                                                            \
  }                                                                                                                \
  void BWD_NAME(torch::Tensor r, torch::Tensor w, torch::Tensor k, torch::Tensor v, torch::Tensor u,               \
                torch::Tensor dy, torch::Tensor dsT, torch::Tensor states, torch::Tensor decay,                   \
                torch::Tensor scores, torch::Tensor dstates, torch::Tensor dr, torch::Tensor dw,                   \
                torch::Tensor dk, torch::Tensor dv, torch::Tensor du, torch::Tensor ds0) {                         \
    wkv::with_element(r, [&](auto e) {                                                                             \
      wkv56c::backward<decltype(e)>(r, w, k, v, u, dy, dsT, states, decay, scores, dstates, dr, dw, dk, dv, du,    \
                                    ds0);                                                                          \
    });                                                                                                            \
  }
