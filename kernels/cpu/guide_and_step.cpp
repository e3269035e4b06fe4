// guide_and_step on float32 CPU buffers: CFG combine, scheduler update and cosine similarity in
// one pass. See cfgswitch_kernels.h for the formulas; every line below rounds once per operation
// (the build sets -ffp-contract=off), in the order diffusers' schedulers evaluate them in torch.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "cfgswitch_kernels.h"

#if defined(CFGSWITCH_OPENMP)
#include <omp.h>
#endif

namespace cfgswitch {
namespace {

// Elements per work item: large enough to amortise the dispatch, small enough to share a 64x64
// latent image between threads. Tile boundaries fix the order of the cosine sums.
constexpr std::int64_t kTile = 8192;

enum Mode : int { kSingle = 0, kGuided = 1, kGuidedCosine = 2 };

using TileFn = void (*)(const float* u, const float* c, const float* x, const float* prev, float* out,
                        float* x0_out, const float* p, std::int64_t n, double* sums);

template <int Form, int M, bool WriteX0>
void step_tile(const float* u, const float* c, const float* x, const float* prev, float* out, float* x0_out,
               const float* p, std::int64_t n, double* sums) {
  const float w = p[0], c0 = p[1], c1 = p[2], c2 = p[3], c3 = p[4], c4 = p[5], c5 = p[6];
  double dot = 0.0, uu = 0.0, cc = 0.0;
#pragma omp simd reduction(+ : dot, uu, cc)
  for (std::int64_t i = 0; i < n; ++i) {
    float e;
    if constexpr (M == kSingle) {
      e = u[i];
    } else {
      const float ui = u[i];
      const float ci = c[i];
      const float diff = ci - ui;
      const float scaled = w * diff;
      e = ui + scaled;
      if constexpr (M == kGuidedCosine) {
        // Products of two floats are exact in double.
        dot += static_cast<double>(ui) * static_cast<double>(ci);
        uu += static_cast<double>(ui) * static_cast<double>(ui);
        cc += static_cast<double>(ci) * static_cast<double>(ci);
      }
    }
    const float xi = x[i];
    constexpr int kBase = Form % kVPrediction;
    constexpr bool kV = Form >= kVPrediction;
    float x0;
    if constexpr (!kV) {
      const float ce = c0 * e;
      const float num = xi - ce;
      x0 = num / c1;
    } else if constexpr (kBase == kEuler) {
      const float ce = c0 * e;
      const float xs = xi / c1;
      x0 = ce + xs;
    } else {
      const float ax = c1 * xi;
      const float se = c0 * e;
      x0 = ax - se;
      if constexpr (kBase == kDdim) {
        const float ae = c1 * e;
        const float sx = c0 * xi;
        e = ae + sx;
      }
    }
    float o;
    if constexpr (kBase == kDdim) {
      const float a = c2 * x0;
      const float b = c3 * e;
      o = a + b;
    } else if constexpr (kBase == kEuler) {
      const float dx = xi - x0;
      const float deriv = dx / c2;
      const float delta = deriv * c3;
      o = xi + delta;
    } else if constexpr (kBase == kMultistep1) {
      const float a = c2 * xi;
      const float b = c3 * x0;
      o = a - b;
    } else {
      const float a = c2 * xi;
      const float b = c3 * x0;
      const float ab = a - b;
      const float dm = x0 - prev[i];
      const float d1 = c4 * dm;
      const float q = c5 * d1;
      o = ab - q;
    }
    if constexpr (WriteX0) {
      x0_out[i] = x0;
    }
    out[i] = o;
  }
  if constexpr (M == kGuidedCosine) {
    sums[0] = dot;
    sums[1] = uu;
    sums[2] = cc;
  }
}

template <int Form, int M>
TileFn pick_x0(bool write_x0) {
  return write_x0 ? &step_tile<Form, M, true> : &step_tile<Form, M, false>;
}

template <int Form>
TileFn pick_mode(int mode, bool write_x0) {
  switch (mode) {
    case kSingle:
      return pick_x0<Form, kSingle>(write_x0);
    case kGuided:
      return pick_x0<Form, kGuided>(write_x0);
    default:
      return pick_x0<Form, kGuidedCosine>(write_x0);
  }
}

TileFn pick(int form, int mode, bool write_x0) {
  switch (form) {
    case kDdim:
      return pick_mode<kDdim>(mode, write_x0);
    case kEuler:
      return pick_mode<kEuler>(mode, write_x0);
    case kMultistep1:
      return pick_mode<kMultistep1>(mode, write_x0);
    case kMultistep2:
      return pick_mode<kMultistep2>(mode, write_x0);
    case kDdimV:
      return pick_mode<kDdimV>(mode, write_x0);
    case kEulerV:
      return pick_mode<kEulerV>(mode, write_x0);
    case kMultistep1V:
      return pick_mode<kMultistep1V>(mode, write_x0);
    default:
      return pick_mode<kMultistep2V>(mode, write_x0);
  }
}

void check_rows(const GuideStepArgs& a) {
  for (std::int64_t b = 0; b < a.batch; ++b) {
    const std::int32_t* r = a.rows + b * kRowsPerImage;
    const std::string where = "image " + std::to_string(b) + ": ";
    if (r[0] < 0 || r[0] >= a.pred_rows) {
      throw std::invalid_argument(where + "row_a: expected a row in [0, " + std::to_string(a.pred_rows) +
                                  "), got " + std::to_string(r[0]));
    }
    if (r[1] < -1 || r[1] >= a.pred_rows) {
      throw std::invalid_argument(where + "row_b: expected -1 or a row in [0, " + std::to_string(a.pred_rows) +
                                  "), got " + std::to_string(r[1]));
    }
    if (r[2] < 0 || r[2] >= kFormCount) {
      throw std::invalid_argument(where + "form: expected 0.." + std::to_string(kFormCount - 1) + ", got " +
                                  std::to_string(r[2]));
    }
    if ((r[2] == kMultistep2 || r[2] == kMultistep2V) && a.prev == nullptr) {
      throw std::invalid_argument(where + "prev: expected the previous x0 for form " + std::to_string(r[2]) +
                                  " (multistep order 2), got null");
    }
  }
}

}  // namespace

void guide_and_step_f32(const GuideStepArgs& a) {
  check_rows(a);
  const auto* pred = static_cast<const float*>(a.pred);
  const auto* x = static_cast<const float*>(a.sample);
  const auto* prev = static_cast<const float*>(a.prev);
  auto* out = static_cast<float*>(a.out);
  auto* x0_out = static_cast<float*>(a.out_x0);
  const std::int64_t per_image = a.per_image;
  const std::int64_t tiles_per_image = (per_image + kTile - 1) / kTile;
  const std::int64_t total = a.batch * tiles_per_image;
  std::vector<double> sums(a.cosine != nullptr ? static_cast<std::size_t>(total * 3) : 0, 0.0);
  double* sums_ptr = sums.data();

#if defined(CFGSWITCH_OPENMP)
  const int threads = a.num_threads > 0 ? a.num_threads
                                        : (a.batch * per_image >= kAutoThreadsFrom ? omp_get_max_threads() : 1);
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && total > 1)
#endif
  for (std::int64_t t = 0; t < total; ++t) {
    const std::int64_t b = t / tiles_per_image;
    const std::int64_t lo = (t % tiles_per_image) * kTile;
    const std::int64_t n = std::min(kTile, per_image - lo);
    const std::int32_t* r = a.rows + b * kRowsPerImage;
    const bool guided = r[1] >= 0;
    const int mode = !guided ? kSingle : (a.cosine != nullptr ? kGuidedCosine : kGuided);
    const TileFn fn = pick(r[2], mode, x0_out != nullptr);
    const float* u = pred + static_cast<std::int64_t>(r[0]) * per_image + lo;
    const float* c = guided ? pred + static_cast<std::int64_t>(r[1]) * per_image + lo : nullptr;
    const std::int64_t off = b * per_image + lo;
    fn(u, c, x + off, prev != nullptr ? prev + off : nullptr, out + off, x0_out != nullptr ? x0_out + off : nullptr,
       a.params + b * kParamsPerImage, n, sums_ptr != nullptr ? sums_ptr + 3 * t : nullptr);
  }

  if (a.cosine == nullptr) {
    return;
  }
  for (std::int64_t b = 0; b < a.batch; ++b) {
    if (a.rows[b * kRowsPerImage + 1] < 0) {
      a.cosine[b] = std::numeric_limits<float>::quiet_NaN();
      continue;
    }
    double dot = 0.0, uu = 0.0, cc = 0.0;
    for (std::int64_t k = 0; k < tiles_per_image; ++k) {
      const double* s = sums_ptr + 3 * (b * tiles_per_image + k);
      dot += s[0];
      uu += s[1];
      cc += s[2];
    }
    // torch.nn.functional.cosine_similarity: each norm clamped to eps = 1e-8.
    const double nu = std::max(std::sqrt(uu), 1e-8);
    const double nc = std::max(std::sqrt(cc), 1e-8);
    a.cosine[b] = static_cast<float>(dot / (nu * nc));
  }
}

}  // namespace cfgswitch
