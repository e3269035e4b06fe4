// guide_and_step on CUDA (float32 and float16 buffers, float32 arithmetic), one launch per call.
//
// Grid: (blocks per image, images). Each thread walks its image with a grid stride, combines the
// two predictions, converts the model output to x0 (epsilon or v-prediction, by the form), applies
// the scheduler update (see cfgswitch_kernels.h for the eight forms) and, for guided images when
// asked, accumulates <u, c>, |u|^2 and |c|^2. Blocks add their sums into a per-image workspace slot
// with double atomics; the last block of an image (ticket counter) turns
// them into the cosine and zeroes the slot again, so the workspace stays ready for the next call.
// Arithmetic uses the _rn intrinsics so nvcc does not contract a*b+c into an FMA: in float32 this
// rounds exactly as the CPU kernel and torch's separate ops do.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "cfgswitch_kernels.h"

namespace {

constexpr int kThreads = 256;
constexpr int kElementsPerThread = 4;
constexpr int kMaxBlocksPerImage = 1024;

struct Slot {
  double dot;
  double uu;
  double cc;
  unsigned int ticket;
  unsigned int pad;
};

__device__ __forceinline__ float load(const float* p, std::int64_t i) { return p[i]; }
__device__ __forceinline__ float load(const __half* p, std::int64_t i) { return __half2float(p[i]); }
__device__ __forceinline__ void store(float* p, std::int64_t i, float v) { p[i] = v; }
__device__ __forceinline__ void store(__half* p, std::int64_t i, float v) { p[i] = __float2half_rn(v); }

__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    v += __shfl_down_sync(0xffffffffu, v, offset);
  }
  return v;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) guide_and_step_kernel(
    const T* __restrict__ pred, const std::int32_t* __restrict__ rows, const float* __restrict__ params,
    const T* sample, const T* __restrict__ prev, T* out, T* __restrict__ x0_out, float* __restrict__ cosine,
    std::int64_t per_image, Slot* __restrict__ slots) {
  const int b = blockIdx.y;
  const std::int32_t* r = rows + b * cfgswitch::kRowsPerImage;
  const float* p = params + b * cfgswitch::kParamsPerImage;
  const std::int32_t row_a = r[0];
  const std::int32_t row_b = r[1];
  const int form = r[2];
  const bool guided = row_b >= 0;
  const bool want_cosine = guided && cosine != nullptr;
  const float w = p[0], c0 = p[1], c1 = p[2], c2 = p[3], c3 = p[4], c4 = p[5], c5 = p[6];

  const T* u = pred + static_cast<std::int64_t>(row_a) * per_image;
  const T* c = guided ? pred + static_cast<std::int64_t>(row_b) * per_image : nullptr;
  const std::int64_t base = static_cast<std::int64_t>(b) * per_image;
  float dot = 0.f, uu = 0.f, cc = 0.f;

  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < per_image;
       i += stride) {
    float e;
    if (guided) {
      const float ui = load(u, i);
      const float ci = load(c, i);
      e = __fadd_rn(ui, __fmul_rn(w, __fsub_rn(ci, ui)));
      if (want_cosine) {
        dot = fmaf(ui, ci, dot);
        uu = fmaf(ui, ui, uu);
        cc = fmaf(ci, ci, cc);
      }
    } else {
      e = load(u, i);
    }
    const float xi = load(sample, base + i);
    const int step = form % cfgswitch::kVPrediction;  // the update; form >= kVPrediction: v-prediction model
    float x0;
    if (form < cfgswitch::kVPrediction) {
      x0 = __fdiv_rn(__fsub_rn(xi, __fmul_rn(c0, e)), c1);
    } else if (step == cfgswitch::kEuler) {
      x0 = __fadd_rn(__fmul_rn(c0, e), __fdiv_rn(xi, c1));
    } else {
      x0 = __fsub_rn(__fmul_rn(c1, xi), __fmul_rn(c0, e));
      if (step == cfgswitch::kDdim) {
        e = __fadd_rn(__fmul_rn(c1, e), __fmul_rn(c0, xi));
      }
    }
    float o;
    switch (step) {
      case cfgswitch::kDdim:
        o = __fadd_rn(__fmul_rn(c2, x0), __fmul_rn(c3, e));
        break;
      case cfgswitch::kEuler:
        o = __fadd_rn(xi, __fmul_rn(__fdiv_rn(__fsub_rn(xi, x0), c2), c3));
        break;
      case cfgswitch::kMultistep1:
        o = __fsub_rn(__fmul_rn(c2, xi), __fmul_rn(c3, x0));
        break;
      default: {
        const float ab = __fsub_rn(__fmul_rn(c2, xi), __fmul_rn(c3, x0));
        const float d1 = __fmul_rn(c4, __fsub_rn(x0, load(prev, base + i)));
        o = __fsub_rn(ab, __fmul_rn(c5, d1));
      }
    }
    if (x0_out != nullptr) {
      store(x0_out, base + i, x0);
    }
    store(out, base + i, o);
  }

  if (!want_cosine) {  // uniform over the block: b and cosine are the same for all its threads
    if (!guided && cosine != nullptr && blockIdx.x == 0 && threadIdx.x == 0) {
      cosine[b] = nanf("");  // one prediction: no cosine
    }
    return;
  }
  __shared__ float partial[3][kThreads / 32];
  dot = warp_sum(dot);
  uu = warp_sum(uu);
  cc = warp_sum(cc);
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  if (lane == 0) {
    partial[0][warp] = dot;
    partial[1][warp] = uu;
    partial[2][warp] = cc;
  }
  __syncthreads();
  if (threadIdx.x != 0) {
    return;
  }
  double s0 = 0.0, s1 = 0.0, s2 = 0.0;
  for (int k = 0; k < kThreads / 32; ++k) {
    s0 += partial[0][k];
    s1 += partial[1][k];
    s2 += partial[2][k];
  }
  Slot* slot = slots + b;
  atomicAdd(&slot->dot, s0);
  atomicAdd(&slot->uu, s1);
  atomicAdd(&slot->cc, s2);
  __threadfence();
  const unsigned int ticket = atomicAdd(&slot->ticket, 1u);
  if (ticket != gridDim.x - 1) {
    return;
  }
  // Last block of this image: every other block's sums are visible (they fenced before their ticket).
  __threadfence();
  const double d = atomicAdd(&slot->dot, 0.0);
  const double nu = fmax(sqrt(atomicAdd(&slot->uu, 0.0)), 1e-8);
  const double nc = fmax(sqrt(atomicAdd(&slot->cc, 0.0)), 1e-8);
  cosine[b] = static_cast<float>(d / (nu * nc));
  slot->dot = 0.0;
  slot->uu = 0.0;
  slot->cc = 0.0;
  slot->ticket = 0u;
}

template <typename T>
int launch(const void* pred, const std::int32_t* rows, const float* params, const void* sample, const void* prev,
           void* out, void* out_x0, float* cosine, std::int64_t batch, std::int64_t per_image, void* workspace,
           cudaStream_t stream) {
  const std::int64_t wanted = (per_image + kThreads * kElementsPerThread - 1) / (kThreads * kElementsPerThread);
  const unsigned int blocks = static_cast<unsigned int>(wanted < kMaxBlocksPerImage ? wanted : kMaxBlocksPerImage);
  const dim3 grid(blocks, static_cast<unsigned int>(batch));
  guide_and_step_kernel<T><<<grid, kThreads, 0, stream>>>(
      static_cast<const T*>(pred), rows, params, static_cast<const T*>(sample), static_cast<const T*>(prev),
      static_cast<T*>(out), static_cast<T*>(out_x0), cosine, per_image, static_cast<Slot*>(workspace));
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

extern "C" {

std::int64_t cfgswitch_guide_and_step_workspace_bytes(std::int64_t batch) {
  return batch * static_cast<std::int64_t>(sizeof(Slot));
}

int cfgswitch_guide_and_step_cuda(const void* pred, const std::int32_t* rows, const float* params,
                                  const void* sample, const void* prev, void* out, void* out_x0, float* cosine,
                                  std::int64_t batch, std::int64_t per_image, std::int64_t pred_rows, int dtype,
                                  void* workspace, void* stream, int device) {
  if (pred == nullptr || rows == nullptr || params == nullptr || sample == nullptr || out == nullptr ||
      batch < 1 || batch > 65535 || per_image < 1 || pred_rows < 1 || (cosine != nullptr && workspace == nullptr)) {
    return -1;
  }
  if (device >= 0) {  // this library's (static) runtime keeps its own current device
    int current = -1;
    if (cudaGetDevice(&current) != cudaSuccess || current != device) {
      const cudaError_t rc = cudaSetDevice(device);
      if (rc != cudaSuccess) {
        return static_cast<int>(rc);
      }
    }
  }
  const auto s = static_cast<cudaStream_t>(stream);
  if (dtype == 0) {
    return launch<float>(pred, rows, params, sample, prev, out, out_x0, cosine, batch, per_image, workspace, s);
  }
  if (dtype == 1) {
    return launch<__half>(pred, rows, params, sample, prev, out, out_x0, cosine, batch, per_image, workspace, s);
  }
  return -1;
}

const char* cfgswitch_cuda_error_string(int code) {
  if (code == -1) {
    return "invalid argument (null buffer, batch outside 1..65535, dtype not 0 or 1, or no workspace)";
  }
  return cudaGetErrorString(static_cast<cudaError_t>(code));
}

}  // extern "C"
