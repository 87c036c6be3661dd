#pragma once
// Blur-kernel geometry shared by the CPU and CUDA implementations: border index mapping,
// exact sub-pixel rasterization of line segments, the Boracchi-Foi camera-shake random walk,
// and the pixel-area integral of a disk. Plain C++ with no ATen/c10 includes so that nvcc
// compiles it on its own; every function is __host__ __device__ under nvcc.
//
// Geometry conventions: a K x K kernel has its pixel (row i, column j) at the point (x = j,
// y = i), y pointing down; its geometric centre is ((K - 1) / 2, (K - 1) / 2). Angles are in
// degrees, counter-clockwise as seen on screen, so direction theta is (cos, -sin) in (x, y).
#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define FD_HD __host__ __device__ inline
#else
#define FD_HD inline
#endif

namespace facedeblur::blur {

// Border modes of blur_synthesize. kReflect is reflect-101 (OpenCV's BORDER_REFLECT_101 and
// torch's pad mode "reflect": the edge pixel is not repeated).
enum Border : int { kReflect = 0, kReplicate = 1, kZeros = 2, kCircular = 3 };

// Index in [0, n) that virtual index i reads under `border`, or -1 (kZeros, outside).
// Reflection is periodic (period 2 (n - 1)), so any distance from the image is defined.
FD_HD int64_t border_index(int64_t i, int64_t n, int border) {
  if (i >= 0 && i < n) return i;
  switch (border) {
    case kReflect: {
      if (n == 1) return 0;
      const int64_t period = 2 * (n - 1);
      int64_t m = i % period;
      if (m < 0) m += period;
      return m < n ? m : period - m;
    }
    case kReplicate:
      return i < 0 ? 0 : n - 1;
    case kCircular: {
      int64_t m = i % n;
      return m < 0 ? m + n : m;
    }
    default:
      return -1;
  }
}

FD_HD double clamp01(double v) { return v < 0.0 ? 0.0 : (v > 1.0 ? 1.0 : v); }

// sin and cos of an angle in degrees, exact (0 and +-1) at multiples of 90 degrees so that
// axis-aligned lines do not leak 1e-16 weights into neighbouring rows.
FD_HD void sincos_deg(double deg, double* s, double* c) {
  double r = fmod(deg, 360.0);
  if (r < 0) r += 360.0;
  const double quarter = floor(r / 90.0 + 0.5);
  const double rad = (r - 90.0 * quarter) * (3.14159265358979323846 / 180.0);
  const double s0 = sin(rad), c0 = cos(rad);
  switch (static_cast<int>(quarter) & 3) {
    case 0: *s = s0; *c = c0; break;
    case 1: *s = c0; *c = -s0; break;
    case 2: *s = -s0; *c = -c0; break;
    default: *s = -c0; *c = s0; break;
  }
}

// Adds `w` to acc[i * K + j] when the pixel lies inside the K x K kernel.
template <typename acc_t>
FD_HD void add_tap(acc_t* acc, int K, double i, double j, double w) {
  if (i >= 0 && j >= 0 && i < K && j < K && w != 0.0) {
    acc[static_cast<int64_t>(i) * K + static_cast<int64_t>(j)] += static_cast<acc_t>(w);
  }
}

// Bilinear (tent) splat of a point of mass `weight`: the sub-pixel rasterization of a point.
template <typename acc_t>
FD_HD void splat_point(acc_t* acc, int K, double x, double y, double weight) {
  const double j0 = floor(x), i0 = floor(y);
  const double fx = x - j0, fy = y - i0;
  add_tap(acc, K, i0, j0, weight * (1 - fx) * (1 - fy));
  add_tap(acc, K, i0, j0 + 1, weight * fx * (1 - fy));
  add_tap(acc, K, i0 + 1, j0, weight * (1 - fx) * fy);
  add_tap(acc, K, i0 + 1, j0 + 1, weight * fx * fy);
}

// Exact integral of the bilinear splat of a point moving at constant speed from a to b, with
// total mass `weight`: tap (i, j) receives weight * int_0^1 tent(x(s) - j) tent(y(s) - i) ds,
// tent(t) = max(0, 1 - |t|). This is the continuous limit of splatting densely sampled
// points, so a path is always a connected, anti-aliased stroke whatever its sampling.
// The segment is cut where x or y crosses an integer; inside a piece the point stays in one
// pixel cell and each of the four weights is a quadratic in s, which Simpson's rule
// integrates exactly. Pieces outside the kernel are dropped, but each costs a step: callers
// crop long segments first (rasterize_motion does).
template <typename acc_t>
FD_HD void splat_segment(acc_t* acc, int K, double ax, double ay, double bx, double by,
                         double weight) {
  const double dx = bx - ax, dy = by - ay;
  const double inf = HUGE_VAL;
  double sx = inf, sy = inf, stx = inf, sty = inf;
  if (dx > 0) {
    sx = (floor(ax) + 1.0 - ax) / dx;
    stx = 1.0 / dx;
  } else if (dx < 0) {
    sx = (ceil(ax) - 1.0 - ax) / dx;
    stx = -1.0 / dx;
  }
  if (dy > 0) {
    sy = (floor(ay) + 1.0 - ay) / dy;
    sty = 1.0 / dy;
  } else if (dy < 0) {
    sy = (ceil(ay) - 1.0 - ay) / dy;
    sty = -1.0 / dy;
  }
  // One piece per integer crossing; the cap only guards against a non-finite input.
  const double max_pieces = ceil(fabs(dx)) + ceil(fabs(dy)) + 4.0;
  double s = 0.0;
  for (double piece = 0; s < 1.0 && piece < max_pieces; piece += 1) {
    const double e = fmin(fmin(sx, sy), 1.0);
    if (e > s) {
      const double sm = 0.5 * (s + e);
      const double xm = ax + sm * dx, ym = ay + sm * dy;
      const double j0 = floor(xm), i0 = floor(ym);
      const double fx0 = clamp01(ax + s * dx - j0), fxm = xm - j0, fx1 = clamp01(ax + e * dx - j0);
      const double fy0 = clamp01(ay + s * dy - i0), fym = ym - i0, fy1 = clamp01(ay + e * dy - i0);
      const double len = (e - s) * weight / 6.0;
      add_tap(acc, K, i0, j0,
              len * ((1 - fx0) * (1 - fy0) + 4 * (1 - fxm) * (1 - fym) + (1 - fx1) * (1 - fy1)));
      add_tap(acc, K, i0, j0 + 1,
              len * (fx0 * (1 - fy0) + 4 * fxm * (1 - fym) + fx1 * (1 - fy1)));
      add_tap(acc, K, i0 + 1, j0,
              len * ((1 - fx0) * fy0 + 4 * (1 - fxm) * fym + (1 - fx1) * fy1));
      add_tap(acc, K, i0 + 1, j0 + 1, len * (fx0 * fy0 + 4 * fxm * fym + fx1 * fy1));
    }
    if (sx <= e) sx += stx;
    if (sy <= e) sy += sty;
    s = e;
  }
}

// Linear motion: a segment of `length` pixels through the kernel centre at `angle_deg`.
// Parts beyond the kernel are cropped (the caller renormalizes).
template <typename acc_t>
FD_HD void rasterize_motion(acc_t* acc, int K, double length, double angle_deg) {
  const double c = 0.5 * (K - 1);
  if (!(length > 0)) {
    splat_point(acc, K, c, c, 1.0);
    return;
  }
  double s, co;
  sincos_deg(angle_deg, &s, &co);
  // Beyond sqrt(2) (c + 1) from the centre a point is outside [-1, K]^2 and reaches no tap:
  // a longer segment gives the same kernel once normalized, and capping its half-length
  // keeps the centre's precision in the endpoints of a huge one.
  const double half = fmin(0.5 * length, 1.5 * (c + 1.0));
  const double hx = half * co, hy = -half * s;
  splat_segment(acc, K, c - hx, c - hy, c + hx, c + hy, 1.0);
}

// Unnormalized Gaussian sampled at pixel centres.
FD_HD double gaussian_tap(int K, int i, int j, double sigma) {
  const double c = 0.5 * (K - 1);
  const double di = i - c, dj = j - c;
  return exp(-(di * di + dj * dj) / (2.0 * sigma * sigma));
}

// int sqrt(r^2 - x^2) dx, an antiderivative valid on [-r, r].
FD_HD double disk_half_chord_integral(double x, double r) {
  const double t = fmax(r * r - x * x, 0.0);
  double u = x / r;
  u = u < -1.0 ? -1.0 : (u > 1.0 ? 1.0 : u);
  return 0.5 * (x * sqrt(t) + r * r * asin(u));
}

// Area of the intersection of the disk of radius r centred at the origin with the rectangle
// [x0, x1] x [y0, y1]. The area is int (min(y1, h(x)) - max(y0, -h(x)))_+ dx, h(x) =
// sqrt(r^2 - x^2); between the breakpoints where h(x) equals |y0| or |y1| the integrand is
// a fixed combination of constants and h, integrated in closed form.
FD_HD double disk_rect_area(double x0, double x1, double y0, double y1, double r) {
  const double a = fmax(x0, -r), b = fmin(x1, r);
  if (!(a < b)) return 0.0;
  double pts[6];
  int n = 0;
  pts[n++] = a;
  pts[n++] = b;
  const double ys[2] = {y0, y1};
  for (int k = 0; k < 2; ++k) {
    if (fabs(ys[k]) <= r) {  // |y| == r: the disk touches the edge at x = 0
      const double xc = sqrt(r * r - ys[k] * ys[k]);
      if (-xc > a && -xc < b) pts[n++] = -xc;
      if (xc > a && xc < b) pts[n++] = xc;
    }
  }
  for (int p = 1; p < n; ++p) {  // insertion sort of at most six values
    const double v = pts[p];
    int q = p - 1;
    while (q >= 0 && pts[q] > v) {
      pts[q + 1] = pts[q];
      --q;
    }
    pts[q + 1] = v;
  }
  double area = 0.0;
  for (int p = 0; p + 1 < n; ++p) {
    const double lo = pts[p], hi = pts[p + 1];
    if (!(hi > lo)) continue;
    const double m = 0.5 * (lo + hi);
    const double hm = sqrt(fmax(r * r - m * m, 0.0));
    const bool top_is_chord = hm < y1, bottom_is_chord = -hm > y0;
    const double top = top_is_chord ? hm : y1, bottom = bottom_is_chord ? -hm : y0;
    if (!(top > bottom)) continue;
    const double chord = disk_half_chord_integral(hi, r) - disk_half_chord_integral(lo, r);
    const double top_int = top_is_chord ? chord : y1 * (hi - lo);
    const double bottom_int = bottom_is_chord ? -chord : y0 * (hi - lo);
    area += top_int - bottom_int;
  }
  return area;
}

// Defocus: the area of the disk of `radius` (centred in the kernel) inside pixel (i, j).
FD_HD double defocus_tap(int K, int i, int j, double radius) {
  const double c = 0.5 * (K - 1);
  const double x = j - c, y = i - c;
  return disk_rect_area(x - 0.5, x + 0.5, y - 0.5, y + 0.5, radius);
}

// Per-kernel parameters of the camera-shake random walk (Boracchi & Foi 2012; the names of
// their createTrajectory.m in comments). Column order of the `params` tensor of the op.
struct TrajectoryParams {
  double anxiety;        // anxiety: amount of shake, 0..0.1 in the original
  double centripetal;    // centripetal: pull towards the start, 0.7 * rand
  double jerk_freq;      // freqBigShakes: probability scale of an impulsive jerk, 0.2 * rand
  double gaussian_term;  // gaussianTerm: strength of the random acceleration, 10 * rand
  double init_angle;     // initial direction in degrees, 360 * rand
  double max_length;     // MaxTotalLength: length of the whole walk in pixels
  double exposure;       // fraction (0, 1] of the walk integrated into the kernel
};
constexpr int kTrajectoryParamCount = 7;

// The random walk: x[0] = 0, constant speed max_length / (T - 1), velocity updated from the
// per-step random numbers: a jerk happens when the uniform step_u[t] is below
// thr = jerk_freq * anxiety, and then step_u[t] / thr (uniform on [0, 1) given the jerk) sets
// its angular deviation, as the original's second rand would; step_n[2t], step_n[2t + 1] are
// the Gaussian acceleration. Positions go to xs[0..T), ys[0..T).
template <typename rand_t>
FD_HD void walk_trajectory(const TrajectoryParams& p, const rand_t* step_u,
                           const rand_t* step_n, int64_t T, double* xs, double* ys) {
  const double step = T > 1 ? p.max_length / static_cast<double>(T - 1) : 0.0;
  double s0, c0;
  sincos_deg(p.init_angle, &s0, &c0);
  double vx = c0 * step, vy = s0 * step;
  if (p.anxiety > 0) {  // as in the original: the first velocity has magnitude `anxiety`
    vx = c0 * p.anxiety;
    vy = s0 * p.anxiety;
  }
  xs[0] = 0.0;
  ys[0] = 0.0;
  const double jerk_threshold = p.jerk_freq * p.anxiety;
  for (int64_t t = 0; t + 1 < T; ++t) {
    double nx = 0.0, ny = 0.0;
    const double u = static_cast<double>(step_u[t]);
    if (u < jerk_threshold) {
      // next direction 2 v exp(i (pi + u' - 0.5)): a jerk roughly against the motion
      const double phi = 3.14159265358979323846 + (u / jerk_threshold - 0.5);
      const double cp = cos(phi), sp = sin(phi);
      nx = 2.0 * (vx * cp - vy * sp);
      ny = 2.0 * (vx * sp + vy * cp);
    }
    const double gx = p.gaussian_term * static_cast<double>(step_n[2 * t]);
    const double gy = p.gaussian_term * static_cast<double>(step_n[2 * t + 1]);
    vx += nx + p.anxiety * (gx - p.centripetal * xs[t]) * step;
    vy += ny + p.anxiety * (gy - p.centripetal * ys[t]) * step;
    const double mag = sqrt(vx * vx + vy * vy);
    if (mag > 0) {
      vx = vx / mag * step;
      vy = vy / mag * step;
    }
    xs[t + 1] = xs[t] + vx;
    ys[t + 1] = ys[t] + vy;
  }
}

// How the exposed part of a walk is placed in the kernel.
enum TrajectoryCentering : int { kCenterBox = 0, kCenterMass = 1 };

// Placement of the exposed part of a walk of T points: kernel position = (p - centre) *
// scale + (K - 1) / 2. kCenterBox centres the bounding box (as Boracchi & Foi's code does);
// kCenterMass puts the time-averaged position, which is the kernel's centroid, on the kernel
// centre so that the blur does not shift the image. The walk is shrunk (scale < 1) only when
// it would not fit. `t_end` is the exposed time in steps, exposure * (T - 1).
struct TrajectoryPlacement {
  double cx, cy, scale, t_end;
};

FD_HD double exposed_point(const double* v, int64_t T, double t) {
  const int64_t k = static_cast<int64_t>(floor(t));
  if (k >= T - 1) return v[T - 1];
  return v[k] + (t - static_cast<double>(k)) * (v[k + 1] - v[k]);
}

FD_HD TrajectoryPlacement place_trajectory(const double* xs, const double* ys, int64_t T, int K,
                                           double exposure, int centering) {
  TrajectoryPlacement pl;
  const double e = exposure > 1.0 ? 1.0 : (exposure > 0.0 ? exposure : 0.0);
  pl.t_end = e * static_cast<double>(T > 0 ? T - 1 : 0);
  const int64_t full = static_cast<int64_t>(floor(pl.t_end));
  const double xe = exposed_point(xs, T, pl.t_end), ye = exposed_point(ys, T, pl.t_end);
  double xmin = xe, xmax = xe, ymin = ye, ymax = ye;
  for (int64_t k = 0; k <= full && k < T; ++k) {
    xmin = fmin(xmin, xs[k]);
    xmax = fmax(xmax, xs[k]);
    ymin = fmin(ymin, ys[k]);
    ymax = fmax(ymax, ys[k]);
  }
  const double half = 0.5 * (K - 1);
  if (centering == kCenterMass && pl.t_end > 0) {
    // time-weighted mean of segment midpoints (constant speed within a segment)
    double sx = 0.0, sy = 0.0, st = 0.0;
    for (int64_t k = 0; k < T - 1 && static_cast<double>(k) < pl.t_end; ++k) {
      const double w = fmin(pl.t_end - static_cast<double>(k), 1.0);
      const double x1 = w < 1.0 ? xe : xs[k + 1], y1 = w < 1.0 ? ye : ys[k + 1];
      sx += w * 0.5 * (xs[k] + x1);
      sy += w * 0.5 * (ys[k] + y1);
      st += w;
    }
    pl.cx = sx / st;
    pl.cy = sy / st;
    const double dev = fmax(fmax(pl.cx - xmin, xmax - pl.cx), fmax(pl.cy - ymin, ymax - pl.cy));
    pl.scale = dev > half ? half / dev : 1.0;
  } else {
    pl.cx = 0.5 * (xmin + xmax);
    pl.cy = 0.5 * (ymin + ymax);
    const double extent = fmax(xmax - xmin, ymax - ymin);
    pl.scale = extent > 2.0 * half ? 2.0 * half / extent : 1.0;
  }
  return pl;
}

// The mass a path leaves in one pixel cell [j, j + 1) x [i, i + 1) while it stays there,
// kept in registers and added to the kernel when the path leaves: a walk step is a few
// hundredths of a pixel, so most steps neither cross a cell edge nor need splat_segment's
// crossing search.
struct CellRun {
  double i = 0, j = 0, w00 = 0, w01 = 0, w10 = 0, w11 = 0;
  bool open = false;

  FD_HD bool contains(double x, double y) const {
    return open && x >= j && x < j + 1 && y >= i && y < i + 1;
  }
  // Exact integral (Simpson on quadratics) of the splat of a segment inside the cell.
  FD_HD void add(double ax, double ay, double bx, double by, double weight) {
    const double fx0 = ax - j, fx1 = bx - j, fy0 = ay - i, fy1 = by - i;
    const double fxm = 0.5 * (fx0 + fx1), fym = 0.5 * (fy0 + fy1);
    const double len = weight / 6.0;
    w00 += len * ((1 - fx0) * (1 - fy0) + 4 * (1 - fxm) * (1 - fym) + (1 - fx1) * (1 - fy1));
    w01 += len * (fx0 * (1 - fy0) + 4 * fxm * (1 - fym) + fx1 * (1 - fy1));
    w10 += len * ((1 - fx0) * fy0 + 4 * (1 - fxm) * fym + (1 - fx1) * fy1);
    w11 += len * (fx0 * fy0 + 4 * fxm * fym + fx1 * fy1);
  }
  template <typename acc_t>
  FD_HD void flush(acc_t* acc, int K) {
    if (open) {
      add_tap(acc, K, i, j, w00);
      add_tap(acc, K, i, j + 1, w01);
      add_tap(acc, K, i + 1, j, w10);
      add_tap(acc, K, i + 1, j + 1, w11);
    }
    open = false;
    w00 = w01 = w10 = w11 = 0;
  }
};

// Rasterizes the exposed part of the walk into acc (K x K, zeroed by the caller): segment k
// carries the time it takes (1 step, the last one possibly a fraction). A walk that does not
// move leaves a single point splat at its placed start.
template <typename acc_t>
FD_HD void rasterize_trajectory(acc_t* acc, int K, const double* xs, const double* ys,
                                int64_t T, const TrajectoryPlacement& pl) {
  const double half = 0.5 * (K - 1);
  double moved = 0.0;
  CellRun run;
  for (int64_t k = 0; k < T - 1 && static_cast<double>(k) < pl.t_end; ++k) {
    const double w = fmin(pl.t_end - static_cast<double>(k), 1.0);
    const double x1 = w < 1.0 ? xs[k] + w * (xs[k + 1] - xs[k]) : xs[k + 1];
    const double y1 = w < 1.0 ? ys[k] + w * (ys[k + 1] - ys[k]) : ys[k + 1];
    const double ax = (xs[k] - pl.cx) * pl.scale + half, ay = (ys[k] - pl.cy) * pl.scale + half;
    const double bx = (x1 - pl.cx) * pl.scale + half, by = (y1 - pl.cy) * pl.scale + half;
    if (ax == bx && ay == by) continue;
    moved += w;
    if (!(run.contains(ax, ay) && run.contains(bx, by))) {
      run.flush(acc, K);
      const double j0 = floor(ax), i0 = floor(ay);
      if (floor(bx) != j0 || floor(by) != i0) {
        splat_segment(acc, K, ax, ay, bx, by, w);  // crosses a cell edge
        continue;
      }
      run.open = true;
      run.i = i0;
      run.j = j0;
    }
    run.add(ax, ay, bx, by, w);
  }
  run.flush(acc, K);
  if (!(moved > 0)) {
    splat_point(acc, K, (xs[0] - pl.cx) * pl.scale + half, (ys[0] - pl.cy) * pl.scale + half, 1.0);
  }
}

}  // namespace facedeblur::blur
