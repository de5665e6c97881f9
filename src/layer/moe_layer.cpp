// The expert-parallel MoE layer: router -> dispatch plan -> dispatch -> experts -> combine,
// and the mirror image in backward. Data flow and conventions: ../shared DESIGN.md and
// docs/moe-layer.md.
#include "layer/dispatch_plan.hpp"

#include <examoe/error.hpp>
#include <examoe/impl/agree.hpp>
#include <examoe/impl/collectives.hpp>
#include <examoe/impl/dispatch_kernels.hpp>
#include <examoe/impl/expert_kernels.hpp>
#include <examoe/impl/kokkos_compat.hpp>
#include <examoe/impl/random.hpp>
#include <examoe/impl/router_kernels.hpp>
#include <examoe/impl/watchdog.hpp>
#include <examoe/impl/workspace.hpp>
#include <examoe/moe_layer.hpp>

#include <algorithm>
#include <chrono>
#include <climits>
#include <cmath>
#include <sstream>

namespace examoe {

// Kernels of the layer's own small steps. Free functions, not members of the (private) Impl:
// nvcc does not allow device lambdas inside a class that is private to another class.
namespace impl {

/// W[i/E][i%E] ~ U(-scale, scale), keyed by (seed, tensor 1, element).
template <class Space, class M>
void init_router_weights(const Space& space, const M& W, std::uint64_t seed, double scale) {
  const int E = static_cast<int>(W.extent(1)), n = static_cast<int>(W.size());
  using S = typename M::non_const_value_type;
  Kokkos::parallel_for(
      "examoe::moe::init_router", Kokkos::RangePolicy<Space>(space, 0, n), KOKKOS_LAMBDA(const int i) {
        const double u = uniform01(hash_key(seed, 1, 0, static_cast<std::uint64_t>(i)));
        W(i / E, i % E) = static_cast<S>(scale * (2 * u - 1));
      });
}

/// w[l][..] ~ U(-scale, scale), keyed by (seed, tensor id, global expert id, element): the
/// same expert gets the same weights on whichever rank holds it.
template <class Space, class T3, class IV>
void init_expert_weights(const Space& space, const T3& w, const IV& gids, std::uint64_t seed,
                         std::uint64_t tensor_id, double scale) {
  const int n1 = static_cast<int>(w.extent(1)), n2 = static_cast<int>(w.extent(2));
  const int total = static_cast<int>(w.extent(0)) * n1 * n2;
  using S = typename T3::non_const_value_type;
  Kokkos::parallel_for(
      "examoe::moe::init_experts", Kokkos::RangePolicy<Space>(space, 0, total),
      KOKKOS_LAMBDA(const int i) {
        const int l = i / (n1 * n2), r = i % (n1 * n2);
        const double u = uniform01(hash_key(seed, tensor_id, static_cast<std::uint64_t>(gids(l)),
                                            static_cast<std::uint64_t>(r)));
        w(l, r / n2, r % n2) = static_cast<S>(scale * (2 * u - 1));
      });
}

/// Row-major index of the first NaN/Inf element of a [n0][n1] matrix, LLONG_MAX if none.
template <class Space, class M>
long long first_nonfinite(const Space& space, const M& v) {
  const int n0 = static_cast<int>(v.extent(0)), n1 = static_cast<int>(v.extent(1));
  long long first = LLONG_MAX;
  Kokkos::parallel_reduce(
      "examoe::moe::finite_check", Kokkos::RangePolicy<Space>(space, 0, n0),
      KOKKOS_LAMBDA(const int i, long long& f) {
        for (int j = 0; j < n1; ++j)
          if (!kc::isfinite(v(i, j))) {
            const long long at = static_cast<long long>(i) * n1 + j;
            if (at < f) f = at;
            break;
          }
      },
      Kokkos::Min<long long>(first));
  return first;
}

/// a += b, element-wise over two [n][m] matrices.
template <class Space, class M>
void accumulate(const Space& space, const M& a, const M& b) {
  const int m = static_cast<int>(a.extent(1)), n = static_cast<int>(a.size());
  Kokkos::parallel_for(
      "examoe::router::accumulate_dWr", Kokkos::RangePolicy<Space>(space, 0, n),
      KOKKOS_LAMBDA(const int i) { a(i / m, i % m) += b(i / m, i % m); });
}

}  // namespace impl

template <class Scalar>
struct MoELayer<Scalar>::Impl {
  using Space = execution_space;
  using Mem = memory_space;
  using IView1 = Kokkos::View<int*, Mem>;
  using IView2 = Kokkos::View<int**, Kokkos::LayoutRight, Mem>;
  using SView1 = Kokkos::View<Scalar*, Mem>;
  using DView1 = Kokkos::View<double*, Mem>;

  MoEConfig cfg;
  Space space;
  std::shared_ptr<Communicator> comm;   // dispatch and combine (data collectives)
  std::shared_ptr<Communicator> scomm;  // router statistics and error agreement (comm or wider)
  std::unique_ptr<impl::Collectives<Space>> coll;  // comm's data collectives on Kokkos memory
  Placement placement;
  int P = 1, me = 0, E = 0, k = 1, d = 0, h = 0, nloc = 0;
  bool swiglu = false;

  // Parameters and gradients.
  matrix Wr, dWr;
  tensor3 W1, W2, W3, dW1, dW2, dW3;

  // Router state of the last forward.
  matrix probs, dz, gates, dgate, dWr_step;
  SView1 lse;
  IView2 topk;
  DView1 aux_coef;  // [E]: alpha E f_e / T_g
  typename DView1::HostMirror aux_coef_h;
  RouterLosses losses;
  double zcoef = 0;  // 2 beta / T_g
  impl::RouterParams rparams;
  std::uint64_t step = 0;
  bool step_set = false;

  // Plan of the last forward (rebuilt from each forward's assignments, reused by backward).
  impl::DispatchPlan plan;
  int T = 0, A = 0;
  std::vector<double> red;  // router statistics allreduce buffer

  // Row buffers.
  matrix send_buf, recv_buf, xe, ye, back_send, back_recv;
  matrix hbuf, ubuf, abuf, dabuf, dubuf, dye, dxe;

  const_matrix x_saved;
  bool have_forward = false;

  LayerStats stats;
  impl::Workspace ws{"examoe::moe::"};

  // ---------------------------------------------------------------- timing
  std::chrono::steady_clock::time_point t0;
  void tic() {
    if (cfg.time_phases) {
      space.fence();
      t0 = std::chrono::steady_clock::now();
    }
  }
  void toc(Phase ph) {
    if (cfg.time_phases) {
      space.fence();
      stats.seconds[static_cast<int>(ph)] +=
          std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      t0 = std::chrono::steady_clock::now();
    }
  }

  Impl(const MoEConfig& c, MPI_Comm mpi_comm, MPI_Comm stats_mpi_comm, const CommOptions& opts,
       const Space& s)
      : cfg(c), space(s) {
    comm = make_communicator(mpi_comm, opts, impl::kc::device_memory_v<Space>,
                             impl::kc::native_stream(space));
    // The statistics are a few host values: MPI.
    scomm = stats_mpi_comm != MPI_COMM_NULL ? std::shared_ptr<Communicator>(make_mpi_communicator(stats_mpi_comm))
                                            : comm;
    setup();
  }
  Impl(const MoEConfig& c, std::shared_ptr<Communicator> cm, std::shared_ptr<Communicator> sc,
       const Space& s)
      : cfg(c), space(s), comm(std::move(cm)), scomm(std::move(sc)) {
    if (!comm) throw Error("examoe::MoELayer::MoELayer: null communicator");
    if (!scomm) scomm = comm;
    setup();
  }

  void setup() {
    coll = std::make_unique<impl::Collectives<Space>>(*comm, space);
    P = comm->size();
    me = comm->rank();
    impl::CollectiveLabel label("moe.config_check");
    // 1. Every rank validates its own config; errors are agreed before anyone throws.
    std::string err;
    try {
      cfg.validate();
      placement = cfg.placement.empty() ? Placement::balanced(cfg.num_experts, P)
                                        : Placement::from_owners(cfg.placement, P);
    } catch (const Error& e) {
      err = std::string("examoe::MoELayer::MoELayer: ") + e.what();
    }
    throw_if_any(*scomm, err);
    // 2. The config must be identical on every rank.
    check_same_config();

    E = cfg.num_experts;
    k = cfg.top_k;
    d = cfg.d_model;
    h = cfg.d_hidden;
    swiglu = cfg.activation == Activation::swiglu;
    rparams.inv_temperature = 1.0 / cfg.router.temperature;
    rparams.renormalize = cfg.router.renormalize;
    rparams.seed = cfg.router.seed;

    const std::string p = "examoe::moe::";
    Wr = matrix(p + "Wr", d, E);
    dWr = matrix(p + "dWr", d, E);
    dWr_step = matrix(p + "dWr_step", d, E);
    aux_coef = DView1(p + "aux_coef", E);
    aux_coef_h = Kokkos::create_mirror_view(aux_coef);
    red.assign(2 * static_cast<std::size_t>(E) + 3, 0.0);
    stats.tokens_per_expert.assign(E, 0);
    apply_placement(placement);
    W1 = tensor3(p + "W1", nloc, d, h);
    W2 = tensor3(p + "W2", nloc, h, d);
    W3 = tensor3(p + "W3", swiglu ? nloc : 0, d, h);
    dW1 = tensor3(p + "dW1", nloc, d, h);
    dW2 = tensor3(p + "dW2", nloc, h, d);
    dW3 = tensor3(p + "dW3", swiglu ? nloc : 0, d, h);
    init_parameters(cfg.router.seed);
  }

  /// Everything that depends on the placement except the expert tensors themselves.
  void apply_placement(const Placement& np) {
    placement = np;
    nloc = placement.num_local(me);
    plan.set_placement(space, placement, me);
    stats.rows_per_local_expert.assign(nloc, 0);
    have_forward = false;  // a plan built for the old placement is void
  }

  /// Moves blocks of `block` elements per expert from the current to the new owners.
  /// `t` holds this rank's experts in local order; returns the new local tensor.
  Kokkos::View<Scalar*, Mem> migrate_flat(const Placement& to, const Scalar* t, std::size_t block) {
    const Placement& from = placement;
    const int nnew = to.num_local(me);
    Kokkos::View<Scalar*, Mem> out("examoe::moe::migrated", static_cast<std::size_t>(nnew) * block);
    std::vector<int> sc(P, 0), sd(P, 0), rc(P, 0), rd(P, 0);
    for (int e = 0; e < E; ++e) {
      const int a = from.owner(e), b = to.owner(e);
      if (a == b) continue;
      if (a == me) ++sc[b];
      if (b == me) ++rc[a];
    }
    int ns = 0, nr = 0;
    for (int r = 0; r < P; ++r) {
      sd[r] = ns; ns += sc[r];
      rd[r] = nr; nr += rc[r];
    }
    Kokkos::View<Scalar*, Mem> sendb("examoe::moe::migrate_send", std::max<std::size_t>(1, ns * block));
    Kokkos::View<Scalar*, Mem> recvb("examoe::moe::migrate_recv", std::max<std::size_t>(1, nr * block));
    using U = Kokkos::View<const Scalar*, Mem, Kokkos::MemoryTraits<Kokkos::Unmanaged>>;
    auto blk = [&](const auto& v, std::size_t i) {
      return Kokkos::subview(v, Kokkos::make_pair(i * block, (i + 1) * block));
    };
    const U old(t, static_cast<std::size_t>(from.num_local(me)) * block);
    std::vector<int> fill(P, 0);
    for (int e = 0; e < E; ++e) {  // increasing global id on both sides
      const int a = from.owner(e), b = to.owner(e);
      if (a == me && b != me) Kokkos::deep_copy(space, blk(sendb, sd[b] + fill[b]++), blk(old, from.local_index(e)));
    }
    impl::CollectiveLabel label("moe.migrate");
    coll->alltoallv_rows(sendb.data(), sc.data(), sd.data(), recvb.data(), rc.data(), rd.data(),
                         static_cast<int>(block));
    std::fill(fill.begin(), fill.end(), 0);
    for (int e = 0; e < E; ++e) {
      const int a = from.owner(e), b = to.owner(e);
      if (b != me) continue;
      if (a == me) Kokkos::deep_copy(space, blk(out, to.local_index(e)), blk(old, from.local_index(e)));
      else Kokkos::deep_copy(space, blk(out, to.local_index(e)), blk(recvb, rd[a] + fill[a]++));
    }
    space.fence();
    return out;
  }

  void set_placement(const Placement& np, std::vector<Kokkos::View<Scalar*, Mem>>& state) {
    std::string err;
    if (np.num_experts() != E || np.num_ranks() != P)
      err = "examoe::MoELayer::set_placement: the placement is for " + std::to_string(np.num_experts()) +
            " experts on " + std::to_string(np.num_ranks()) + " ranks; the layer has " + std::to_string(E) +
            " experts on " + std::to_string(P) + " ranks";
    throw_if_any(*comm, err);
    const std::size_t block = static_cast<std::size_t>(d) * h;
    auto move3 = [&](tensor3& w, bool present) {
      if (!present) return;
      auto flat = migrate_flat(np, w.data(), block);
      tensor3 nw(Kokkos::view_alloc(Kokkos::WithoutInitializing, w.label()), np.num_local(me), w.extent(1), w.extent(2));
      Kokkos::deep_copy(space, Kokkos::View<Scalar*, Mem, Kokkos::MemoryTraits<Kokkos::Unmanaged>>(nw.data(), nw.size()), flat);
      w = nw;
    };
    move3(W1, true);
    move3(W2, true);
    move3(W3, swiglu);
    for (auto& t : state) t = migrate_flat(np, t.data(), block);
    const int nn = np.num_local(me);
    dW1 = tensor3("examoe::moe::dW1", nn, d, h);
    dW2 = tensor3("examoe::moe::dW2", nn, h, d);
    dW3 = tensor3("examoe::moe::dW3", swiglu ? nn : 0, d, h);
    apply_placement(np);
    space.fence();
  }

  void check_same_config() {
    std::vector<impl::NamedValue> fields;
    std::istringstream lines(cfg.to_string());
    for (std::string line; std::getline(lines, line);) {
      const std::size_t eq = line.find('=');
      fields.push_back({line.substr(0, eq), eq == std::string::npos ? std::string() : line.substr(eq + 1)});
    }
    impl::check_same_on_every_rank(*scomm, fields, "examoe::MoELayer::MoELayer", "MoE config");
  }

  void init_parameters(std::uint64_t seed) {
    impl::init_router_weights(space, Wr, seed, 1.0 / std::sqrt(static_cast<double>(d)));
    IView1 gids("examoe::moe::global_ids", std::max(1, nloc));
    auto gh = Kokkos::create_mirror_view(gids);
    for (int l = 0; l < nloc; ++l) gh(l) = placement.global_expert(me, l);
    Kokkos::deep_copy(gids, gh);
    const int dd = d, hh = h;
    auto init3 = [&](const tensor3& w, std::uint64_t tensor_id, double scale) {
      impl::init_expert_weights(space, w, gids, seed, tensor_id, scale);
    };
    init3(W1, 2, 1.0 / std::sqrt(static_cast<double>(dd)));
    init3(W2, 3, 1.0 / std::sqrt(static_cast<double>(hh)));
    init3(W3, 4, 1.0 / std::sqrt(static_cast<double>(dd)));
    space.fence();
  }

  // ------------------------------------------------------------------ forward
  /// "" if every element of v is finite, else a message naming the first bad one.
  std::string nonfinite_message(const const_matrix& v, const char* fn, const char* name) {
    const int n0 = static_cast<int>(v.extent(0)), n1 = static_cast<int>(v.extent(1));
    if (n0 == 0 || n1 == 0) return {};
    const long long first = impl::first_nonfinite(space, v);
    if (first == LLONG_MAX) return {};
    const int i = static_cast<int>(first / n1), j = static_cast<int>(first % n1);
    auto hv = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), Kokkos::subview(v, i, j));
    std::ostringstream os;
    os << "examoe::MoELayer::" << fn << ": " << name << " contains non-finite values (" << name << "(" << i
       << ", " << j << ") = " << static_cast<double>(hv()) << " on rank " << comm->rank()
       << " of the expert-parallel group); the inputs must be finite";
    return os.str();
  }

  void forward(const const_matrix& x, const matrix& out, bool training) {
    impl::kc::ScopedRegion region("examoe::MoELayer::forward");
    impl::CollectiveLabel label("moe.router");
    have_forward = false;  // until this forward completes, backward has nothing to reuse
    for (auto& s : stats.seconds) s = 0;
    tic();
    // Shape errors are local: agree on them inside the router statistics allreduce below,
    // so a bad rank does not leave the others waiting in a collective.
    std::string err;
    if (x.extent(1) != static_cast<std::size_t>(d) || out.extent(1) != static_cast<std::size_t>(d) ||
        out.extent(0) != x.extent(0))
      err = "examoe::MoELayer::forward: expected x and out of shape [T][" + std::to_string(d) +
            "], got x [" + std::to_string(x.extent(0)) + "][" + std::to_string(x.extent(1)) +
            "] and out [" + std::to_string(out.extent(0)) + "][" + std::to_string(out.extent(1)) + "]";
    else if (static_cast<long long>(x.extent(0)) * k > INT_MAX / 2)
      err = "examoe::MoELayer::forward: T * top_k = " + std::to_string(x.extent(0) * k) +
            " assignments exceed the supported 2^30";
    else if (cfg.check_finite_inputs)
      err = nonfinite_message(x, "forward", "x");
    throw_if_any(*scomm, err);

    T = static_cast<int>(x.extent(0));
    A = T * k;
    x_saved = x;
    if (!step_set) ++step;
    step_set = false;
    rparams.step = step;
    rparams.jitter = training ? cfg.router.jitter : 0.0;
    rparams.token_offset = rparams.jitter > 0 ? scomm->exscan_sum(T) : 0;

    // ---- router
    ws.reserve(probs, "probs", T, E);
    ws.reserve(lse, "lse", T);
    ws.reserve(topk, "topk", T, k);
    ws.reserve(gates, "gates", T, k);
    auto p = impl::rows_of(probs, T);
    auto l = impl::head(lse, T);
    auto tk = impl::rows_of(topk, T);
    auto g = impl::rows_of(gates, T);
    impl::kc::gemm(space, "N", "N", Scalar(1), x, Wr, Scalar(0), p);
    impl::router_softmax_topk(space, rparams, p, l, tk, g);
    std::fill(red.begin(), red.end(), 0.0);
    if (T > 0) {
      impl::RouterStatsFunctor<Space, decltype(p), decltype(l)> f(p, l);
      Kokkos::View<double*, Kokkos::HostSpace, Kokkos::MemoryTraits<Kokkos::Unmanaged>> result(
          red.data() + E, static_cast<std::size_t>(E) + 1);
      Kokkos::parallel_reduce("examoe::router::stats", Kokkos::RangePolicy<Space>(space, 0, T), f,
                              result);
    }
    toc(Phase::router);

    // ---- plan, local half: stable sort by (owner rank, local expert)
    plan.sort(space, tk);

    // Global router statistics (and agreement that every rank got here): one allreduce of
    // [counts E | prob sums E | lse^2 sum | T | 0].
    for (int e = 0; e < E; ++e) red[e] = plan.assignments_to(e);
    red[2 * E + 1] = T;
    scomm->allreduce_sum(red.data(), red.size(), DataType::f64);
    const double Tg = red[2 * E + 1];
    {
      const double alpha = cfg.router.aux_loss_coef, beta = cfg.router.z_loss_coef;
      double aux = 0;
      for (int e = 0; e < E; ++e) {
        stats.tokens_per_expert[e] = static_cast<std::int64_t>(red[e]);
        const double f = Tg > 0 ? red[e] / (k * Tg) : 0.0;
        const double Pe = Tg > 0 ? red[E + e] / Tg : 0.0;
        aux += f * Pe;
        aux_coef_h(e) = Tg > 0 ? alpha * E * f / Tg : 0.0;
      }
      losses.aux = alpha * E * aux;
      losses.z = Tg > 0 ? beta * red[2 * E] / Tg : 0.0;
      zcoef = Tg > 0 ? 2.0 * beta / Tg : 0.0;
      Kokkos::deep_copy(space, aux_coef, aux_coef_h);
      // Imbalance of expert rows per rank, from the global counts.
      double mx = 0, sum = 0;
      for (int r = 0; r < P; ++r) {
        double rr = 0;
        for (int lx = 0; lx < placement.num_local(r); ++lx) rr += red[placement.global_expert(r, lx)];
        mx = std::max(mx, rr);
        sum += rr;
      }
      stats.imbalance = sum > 0 ? mx / (sum / P) : 1.0;
    }
    // ---- plan, collective half: counts exchange and layout
    plan.exchange_counts(space, *comm);
    record_plan_stats();
    toc(Phase::plan);

    // ---- dispatch
    const int nrows = plan.expert_rows();
    ws.reserve(send_buf, "send_buf", plan.rows_sent(), d);
    ws.reserve(recv_buf, "recv_buf", plan.rows_received(), d);
    ws.reserve(xe, "xe", nrows, d);
    auto sb = impl::rows_of(send_buf, plan.rows_sent());
    impl::pack_rows(space, x, plan.perm(), k, plan.self_begin(), plan.self_count(), g, false, sb);
    toc(Phase::pack);
    exchange_dispatch("moe.dispatch", send_buf, recv_buf);
    toc(Phase::alltoall);
    impl::gather_expert_rows(space, plan.blocks(), plan.num_blocks(), nrows, x, plan.perm(), k, g,
                             false, recv_buf, xe);
    toc(Phase::pack);

    // ---- experts
    ws.reserve(hbuf, "h", nrows, h);
    ws.reserve(abuf, "a", nrows, h);
    if (swiglu) ws.reserve(ubuf, "u", nrows, h);
    ws.reserve(ye, "ye", nrows, d);
    expert_forward();
    toc(Phase::experts);

    // ---- combine
    ws.reserve(back_send, "back_send", plan.rows_received(), d);
    ws.reserve(back_recv, "back_recv", plan.rows_sent(), d);
    impl::pack_back_rows(space, plan.blocks(), plan.num_blocks(), nrows, ye, back_send);
    exchange_combine("moe.combine", back_send, back_recv);
    impl::combine_rows(space, plan.return_location(), k, g, true, ye, back_recv, false, out);
    toc(Phase::combine);
    have_forward = true;
  }

  /// The dispatch statistics of this step's plan.
  void record_plan_stats() {
    for (int lx = 0; lx < nloc; ++lx)
      stats.rows_per_local_expert[lx] = plan.expert_row_begin(lx + 1) - plan.expert_row_begin(lx);
    const std::int64_t row_bytes = static_cast<std::int64_t>(d) * sizeof(Scalar);
    const std::int64_t sent = plan.rows_sent(), received = plan.rows_received();
    stats.tokens = T;
    stats.assignments = A;
    stats.rows_local = plan.self_count();
    stats.rows_sent = sent;
    stats.rows_received = received;
    stats.expert_rows = plan.expert_rows();
    stats.bytes_sent_dispatch = sent * row_bytes;
    stats.bytes_recv_dispatch = received * row_bytes;
    stats.bytes_sent_combine = received * row_bytes;
    stats.bytes_recv_combine = sent * row_bytes;
  }

  /// ONE variable-size all-to-all of rows in the dispatch direction (the plan's counts)...
  void exchange_dispatch(const char* label, const matrix& send, const matrix& recv) {
    impl::CollectiveLabel scope(label);
    coll->alltoallv_rows(send.data(), plan.send_counts().data(), plan.send_displs().data(),
                         recv.data(), plan.recv_counts().data(), plan.recv_displs().data(), d);
  }
  /// ... and in the combine direction (the same counts, send and receive swapped).
  void exchange_combine(const char* label, const matrix& send, const matrix& recv) {
    impl::CollectiveLabel scope(label);
    coll->alltoallv_rows(send.data(), plan.recv_counts().data(), plan.recv_displs().data(),
                         recv.data(), plan.send_counts().data(), plan.send_displs().data(), d);
  }

  template <class V>
  static auto rows(const V& v, int b, int e) {
    return Kokkos::subview(v, Kokkos::make_pair(b, e), Kokkos::ALL);
  }
  auto expert_w(const tensor3& w, int lx) const {
    return Kokkos::subview(w, lx, Kokkos::ALL, Kokkos::ALL);
  }

  void expert_forward() {
    const int nrows = plan.expert_rows();
    auto H = impl::rows_of(hbuf, nrows);
    auto Aa = impl::rows_of(abuf, nrows);
    for (int lx = 0; lx < nloc; ++lx) {
      const int b = plan.expert_row_begin(lx), e = plan.expert_row_begin(lx + 1);
      if (b == e) continue;
      impl::kc::gemm(space, "N", "N", Scalar(1), rows(xe, b, e), expert_w(W1, lx), Scalar(0),
                     rows(hbuf, b, e));
      if (swiglu)
        impl::kc::gemm(space, "N", "N", Scalar(1), rows(xe, b, e), expert_w(W3, lx), Scalar(0),
                       rows(ubuf, b, e));
    }
    if (swiglu)
      impl::swiglu_forward(space, H, impl::rows_of(ubuf, nrows), Aa);
    else
      impl::gelu_forward(space, H, Aa);
    for (int lx = 0; lx < nloc; ++lx) {
      const int b = plan.expert_row_begin(lx), e = plan.expert_row_begin(lx + 1);
      if (b == e) continue;
      impl::kc::gemm(space, "N", "N", Scalar(1), rows(abuf, b, e), expert_w(W2, lx), Scalar(0),
                     rows(ye, b, e));
    }
  }

  // ----------------------------------------------------------------- backward
  void backward(const const_matrix& dout, const matrix& dx) {
    impl::kc::ScopedRegion region("examoe::MoELayer::backward");
    impl::CollectiveLabel label("moe.backward");
    std::string err;
    if (!have_forward)
      err = "examoe::MoELayer::backward: called without a preceding forward";
    else if (dout.extent(0) != static_cast<std::size_t>(T) || dout.extent(1) != static_cast<std::size_t>(d) ||
             dx.extent(0) != static_cast<std::size_t>(T) || dx.extent(1) != static_cast<std::size_t>(d))
      err = "examoe::MoELayer::backward: expected dout and dx of shape [" + std::to_string(T) +
            "][" + std::to_string(d) + "] (the last forward's x), got dout [" +
            std::to_string(dout.extent(0)) + "][" + std::to_string(dout.extent(1)) + "] and dx [" +
            std::to_string(dx.extent(0)) + "][" + std::to_string(dx.extent(1)) + "]";
    else if (cfg.check_finite_inputs)
      err = nonfinite_message(dout, "backward", "dout");
    throw_if_any(*scomm, err);
    tic();
    auto g = impl::rows_of(gates, T);
    ws.reserve(dgate, "dgate", T, k);
    auto dg = impl::rows_of(dgate, T);
    // ---- combine^T: gate gradients, then dy = gate * dout dispatched like x
    impl::gate_grads(space, plan.return_location(), k, ye, back_recv, dout, dg);
    auto sb = impl::rows_of(send_buf, plan.rows_sent());
    impl::pack_rows(space, dout, plan.perm(), k, plan.self_begin(), plan.self_count(), g, true, sb);
    toc(Phase::bwd_combine);
    exchange_dispatch("moe.combine_bwd", send_buf, recv_buf);
    toc(Phase::bwd_alltoall);
    const int nrows = plan.expert_rows();
    ws.reserve(dye, "dye", nrows, d);
    impl::gather_expert_rows(space, plan.blocks(), plan.num_blocks(), nrows, dout, plan.perm(), k,
                             g, true, recv_buf, dye);
    toc(Phase::bwd_combine);

    // ---- experts
    ws.reserve(dabuf, "da", nrows, h);
    if (swiglu) ws.reserve(dubuf, "du", nrows, h);
    ws.reserve(dxe, "dxe", nrows, d);
    expert_backward();
    toc(Phase::bwd_experts);

    // ---- dispatch^T: dx rows go home
    impl::pack_back_rows(space, plan.blocks(), plan.num_blocks(), nrows, dxe, back_send);
    exchange_combine("moe.dispatch_bwd", back_send, back_recv);
    toc(Phase::bwd_alltoall);

    // ---- router backward
    ws.reserve(dz, "dz", T, E);
    auto dzv = impl::rows_of(dz, T);
    impl::router_backward(space, rparams, impl::rows_of(probs, T), impl::head(lse, T),
                          impl::rows_of(topk, T), g, dg, aux_coef, zcoef, dzv);
    if (T > 0)
      impl::kc::gemm(space, "T", "N", Scalar(1), x_saved, dzv, Scalar(0), dWr_step);
    else
      Kokkos::deep_copy(space, dWr_step, Scalar(0));
    if (cfg.reduce_router_grad) {
      impl::CollectiveLabel scope("moe.router_grad");
      coll->allreduce_sum(dWr_step.data(), dWr_step.size());
    }
    impl::accumulate(space, dWr, dWr_step);
    impl::kc::gemm(space, "N", "T", Scalar(1), dzv, Wr, Scalar(0), dx);
    impl::combine_rows(space, plan.return_location(), k, g, false, dxe, back_recv, true, dx);
    toc(Phase::bwd_router);
  }

  void expert_backward() {
    const int nrows = plan.expert_rows();
    // da = dy W2^T, dW2 += a^T dy
    for (int lx = 0; lx < nloc; ++lx) {
      const int b = plan.expert_row_begin(lx), e = plan.expert_row_begin(lx + 1);
      if (b == e) continue;
      impl::kc::gemm(space, "N", "T", Scalar(1), rows(dye, b, e), expert_w(W2, lx), Scalar(0),
                     rows(dabuf, b, e));
      impl::kc::gemm(space, "T", "N", Scalar(1), rows(abuf, b, e), rows(dye, b, e), Scalar(1),
                     expert_w(dW2, lx));
    }
    auto H = impl::rows_of(hbuf, nrows);
    auto dA = impl::rows_of(dabuf, nrows);
    if (swiglu)
      impl::swiglu_backward(space, H, impl::rows_of(ubuf, nrows), dA, impl::rows_of(dubuf, nrows));
    else
      impl::gelu_backward(space, H, dA);
    for (int lx = 0; lx < nloc; ++lx) {
      const int b = plan.expert_row_begin(lx), e = plan.expert_row_begin(lx + 1);
      if (b == e) continue;
      impl::kc::gemm(space, "T", "N", Scalar(1), rows(xe, b, e), rows(dabuf, b, e), Scalar(1),
                     expert_w(dW1, lx));
      impl::kc::gemm(space, "N", "T", Scalar(1), rows(dabuf, b, e), expert_w(W1, lx), Scalar(0),
                     rows(dxe, b, e));
      if (swiglu) {
        impl::kc::gemm(space, "T", "N", Scalar(1), rows(xe, b, e), rows(dubuf, b, e), Scalar(1),
                       expert_w(dW3, lx));
        impl::kc::gemm(space, "N", "T", Scalar(1), rows(dubuf, b, e), expert_w(W3, lx), Scalar(1),
                       rows(dxe, b, e));
      }
    }
  }
};

// ------------------------------------------------------------------- MoELayer
template <class S>
MoELayer<S>::MoELayer(const MoEConfig& config, MPI_Comm comm, const execution_space& space)
    : impl_(std::make_unique<Impl>(config, comm, MPI_COMM_NULL, CommOptions{}, space)) {}
template <class S>
MoELayer<S>::MoELayer(const MoEConfig& config, MPI_Comm comm, MPI_Comm stats_comm,
                      const execution_space& space)
    : impl_(std::make_unique<Impl>(config, comm, stats_comm, CommOptions{}, space)) {}
template <class S>
MoELayer<S>::MoELayer(const MoEConfig& config, MPI_Comm comm, MPI_Comm stats_comm,
                      const CommOptions& opts, const execution_space& space)
    : impl_(std::make_unique<Impl>(config, comm, stats_comm, opts, space)) {}
template <class S>
MoELayer<S>::MoELayer(const MoEConfig& config, std::shared_ptr<Communicator> comm,
                      std::shared_ptr<Communicator> stats_comm, const execution_space& space)
    : impl_(std::make_unique<Impl>(config, std::move(comm), std::move(stats_comm), space)) {}
template <class S>
void MoELayer<S>::set_placement(const Placement& p, std::vector<flat_vector>& state) {
  impl_->set_placement(p, state);
}
template <class S>
void MoELayer<S>::set_placement(const Placement& p) {
  std::vector<flat_vector> none;
  impl_->set_placement(p, none);
}
template <class S>
void MoELayer<S>::set_step(std::uint64_t step) {
  impl_->step = step;
  impl_->step_set = true;
}
template <class S>
MoELayer<S>::~MoELayer() = default;
template <class S>
MoELayer<S>::MoELayer(MoELayer&&) noexcept = default;
template <class S>
MoELayer<S>& MoELayer<S>::operator=(MoELayer&&) noexcept = default;

template <class S>
void MoELayer<S>::init_parameters(std::uint64_t seed) { impl_->init_parameters(seed); }
template <class S>
void MoELayer<S>::forward(const const_matrix& x, const matrix& out, bool training) {
  impl_->forward(x, out, training);
}
template <class S>
void MoELayer<S>::backward(const const_matrix& dout, const matrix& dx) {
  impl_->backward(dout, dx);
}
template <class S>
void MoELayer<S>::zero_grad() {
  Kokkos::deep_copy(impl_->space, impl_->dWr, S(0));
  Kokkos::deep_copy(impl_->space, impl_->dW1, S(0));
  Kokkos::deep_copy(impl_->space, impl_->dW2, S(0));
  Kokkos::deep_copy(impl_->space, impl_->dW3, S(0));
}
template <class S>
RouterLosses MoELayer<S>::losses() const { return impl_->losses; }
template <class S>
const LayerStats& MoELayer<S>::stats() const { return impl_->stats; }
template <class S>
const Placement& MoELayer<S>::placement() const { return impl_->placement; }
template <class S>
const MoEConfig& MoELayer<S>::config() const { return impl_->cfg; }
template <class S>
Communicator& MoELayer<S>::communicator() { return *impl_->comm; }
template <class S>
auto MoELayer<S>::space() const -> const execution_space& { return impl_->space; }
template <class S>
auto MoELayer<S>::router_weight() const -> matrix { return impl_->Wr; }
template <class S>
auto MoELayer<S>::router_grad() const -> matrix { return impl_->dWr; }
template <class S>
auto MoELayer<S>::w1() const -> tensor3 { return impl_->W1; }
template <class S>
auto MoELayer<S>::w2() const -> tensor3 { return impl_->W2; }
template <class S>
auto MoELayer<S>::w3() const -> tensor3 { return impl_->W3; }
template <class S>
auto MoELayer<S>::w1_grad() const -> tensor3 { return impl_->dW1; }
template <class S>
auto MoELayer<S>::w2_grad() const -> tensor3 { return impl_->dW2; }
template <class S>
auto MoELayer<S>::w3_grad() const -> tensor3 { return impl_->dW3; }
template <class S>
auto MoELayer<S>::weights(ExpertTensor t) const -> tensor3 {
  return t == ExpertTensor::w1 ? impl_->W1 : t == ExpertTensor::w2 ? impl_->W2 : impl_->W3;
}
template <class S>
auto MoELayer<S>::weight_grads(ExpertTensor t) const -> tensor3 {
  return t == ExpertTensor::w1 ? impl_->dW1 : t == ExpertTensor::w2 ? impl_->dW2 : impl_->dW3;
}
template <class S>
std::vector<ExpertTensor> MoELayer<S>::expert_tensors() const {
  if (impl_->swiglu) return {ExpertTensor::w1, ExpertTensor::w2, ExpertTensor::w3};
  return {ExpertTensor::w1, ExpertTensor::w2};
}
template <class S>
int MoELayer<S>::num_local_experts() const { return impl_->nloc; }
template <class S>
auto MoELayer<S>::topk_experts() const -> Kokkos::View<int**, Kokkos::LayoutRight, memory_space> {
  return impl::rows_of(impl_->topk, impl_->T);
}
template <class S>
auto MoELayer<S>::gates() const -> matrix {
  return impl::rows_of(impl_->gates, impl_->T);
}
template <class S>
std::int64_t MoELayer<S>::workspace_allocations() const {
  return impl_->ws.allocations() + impl_->plan.workspace_allocations();
}

template class MoELayer<float>;
template class MoELayer<double>;

}  // namespace examoe
