// The expert-parallel MoE layer: router -> dispatch plan -> dispatch -> experts -> combine,
// and the mirror image in backward. It composes its parts (docs/moe-layer.md):
//   impl::Router        router.{hpp,cpp}          Wr, top-k, gates, global statistics, losses
//   impl::DispatchPlan  dispatch_plan.{hpp,cpp}   this step's counts, offsets and permutation
//   impl::CapacitySelector capacity.{hpp,cpp}     which assignments an expert keeps (capacity)
//   impl::Experts       experts.{hpp,cpp}         local expert weights, expert rows, GEMMs
//   impl::RowWorkspace  row_workspace.hpp         the all-to-all row buffers
//   impl::MigrationPlan migration_plan.{hpp,cpp}  the experts' move to a new placement
// Data flow and conventions: docs/moe-layer.md.
#include "layer/capacity.hpp"
#include "layer/dispatch_plan.hpp"
#include "layer/experts.hpp"
#include "layer/migration_plan.hpp"
#include "layer/phase_timer.hpp"
#include "layer/router.hpp"
#include "layer/row_workspace.hpp"

#include <examoe/error.hpp>
#include <examoe/impl/agree.hpp>
#include <examoe/impl/collectives.hpp>
#include <examoe/impl/dispatch_kernels.hpp>
#include <examoe/impl/host_sync.hpp>
#include <examoe/impl/host_vector_kernels.hpp>
#include <examoe/impl/kokkos_compat.hpp>
#include <examoe/impl/watchdog.hpp>
#include <examoe/moe_layer.hpp>

#include <algorithm>
#include <climits>
#include <cmath>
#include <optional>
#include <sstream>
#include <type_traits>

namespace examoe {

// Kernels of the layer's own small steps. Free functions, not members of the (private) Impl:
// nvcc does not allow device lambdas inside a class that is private to another class.
namespace impl {

/// first() = row-major index of the first NaN/Inf element of a [n0][n1] matrix, LLONG_MAX
/// if none, written on the device (the minimum over rows is order-independent).
template <class Space, class M, class F>
void find_first_nonfinite(const Space& space, const M& v, const F& first) {
  const int n0 = static_cast<int>(v.extent(0)), n1 = static_cast<int>(v.extent(1));
  Kokkos::deep_copy(space, first, LLONG_MAX);
  if constexpr (!kc::device_memory_v<Space>) {
    // Host backends: rows in blocks of 64, each row one vectorized scan (host::first_nonfinite).
    static_assert(std::is_same<typename M::array_layout, Kokkos::LayoutRight>::value,
                  "find_first_nonfinite: host rows are read through pointers");
    if (n1 == 0) return;
    constexpr int R = 64;
    Kokkos::parallel_for(
        "examoe::moe::finite_check", Kokkos::RangePolicy<Space>(space, 0, (n0 + R - 1) / R), [=](const int b) {
          const int end = n0 - b * R < R ? n0 : (b + 1) * R;
          for (int i = b * R; i < end; ++i) {
            const std::size_t j = host::first_nonfinite(&v(i, 0), static_cast<std::size_t>(n1));
            if (j < static_cast<std::size_t>(n1)) {
              Kokkos::atomic_fetch_min(&first(0), static_cast<long long>(i) * n1 + static_cast<long long>(j));
              return;
            }
          }
        });
  } else {
    // GPUs: one team per row, its threads over the row (coalesced); only a row with a
    // non-finite element looks for the first one.
    using team = typename Kokkos::TeamPolicy<Space>::member_type;
    Kokkos::parallel_for(
        "examoe::moe::finite_check", row_policy(space, n0, n1), KOKKOS_LAMBDA(const team& m) {
          const int i = m.league_rank();
          int bad = 0;
          Kokkos::parallel_reduce(
              Kokkos::TeamThreadRange(m, n1), [&](const int j, int& b) { b += kc::isfinite(v(i, j)) ? 0 : 1; }, bad);
          if (bad == 0) return;
          Kokkos::single(Kokkos::PerTeam(m), [&]() {
            for (int j = 0; j < n1; ++j)
              if (!kc::isfinite(v(i, j))) {
                Kokkos::atomic_fetch_min(&first(0), static_cast<long long>(i) * n1 + j);
                break;
              }
          });
        });
  }
}

}  // namespace impl

template <class Scalar>
struct MoELayer<Scalar>::Impl {
  using Space = execution_space;

  MoEConfig cfg;
  Space space;
  std::shared_ptr<Communicator> comm;   // dispatch and combine (data collectives)
  std::shared_ptr<Communicator> scomm;  // router statistics and error agreement (comm or wider)
  std::unique_ptr<impl::Collectives<Space>> coll;  // comm's data collectives on Kokkos memory
  Placement placement;
  int P = 1, me = 0, E = 0, k = 1, d = 0, nloc = 0;

  // The parts: router, this step's plan (rebuilt by each forward, reused by backward),
  // the local experts, the row buffers of the exchanges.
  std::unique_ptr<impl::Router<Scalar>> router;
  impl::DispatchPlan plan;
  impl::CapacitySelector capacity;  // with cfg.capacity_factor > 0
  std::unique_ptr<impl::Experts<Scalar>> experts;
  impl::RowWorkspace<Scalar> scalar_rows;  // rows on the wire in the layer's scalar ...
  impl::RowWorkspace<impl::bf16> bf16_rows;  // ... or in bf16 (cfg.dispatch_dtype)

  int T = 0, A = 0;
  const_matrix x_saved;
  bool have_forward = false;
  LayerStats stats;
  impl::HostReadback<Space>::Slot first_bad_slot;  // [1]: first non-finite input element

  // ---------------------------------------------------------------- timing
  impl::PhaseTimer<Space> timer{space};
  void tic() {
    if (cfg.time_phases) timer.start();
  }
  void toc(Phase ph) {
    if (cfg.time_phases) timer.mark(ph);
  }
  /// The statistics, with the phase times marked so far (on CUDA: one wait for their events).
  const LayerStats& current_stats() {
    timer.collect(stats.seconds.data());
    return stats;
  }

  // ---------------------------------------------------------------- setup
  Impl(const MoEConfig& c, const MoELayerOptions& o) : cfg(c), space(o.space) {
    const std::string f = "examoe::MoELayer::MoELayer: ";
    if (o.shared_comm && o.comm != MPI_COMM_NULL)
      throw Error(f + "options.comm and options.shared_comm are both set; give one of them");
    if (o.shared_comm)
      comm = o.shared_comm;
    else if (o.comm != MPI_COMM_NULL)
      comm = make_communicator(o.comm, o.comm_options, impl::kc::device_memory_v<Space>,
                               impl::kc::native_stream(space));
    else
      throw Error(f + "null communicator (set options.comm or options.shared_comm)");
    // The statistics are a few host values: MPI.
    if (o.shared_stats_comm)
      scomm = o.shared_stats_comm;
    else if (o.stats_comm != MPI_COMM_NULL)
      scomm = make_mpi_communicator(o.stats_comm);
    else
      scomm = comm;
    setup();
  }

  void setup() {
    coll = std::make_unique<impl::Collectives<Space>>(*comm, space);
    P = comm->size();
    me = comm->rank();
    impl::CollectiveLabel label("moe.config_check");
    // 1. Every rank validates its own config; errors are agreed before anyone throws.
    impl::agree(
        *scomm,
        [&] {
          cfg.validate();
          placement = cfg.placement.empty() ? Placement::balanced(cfg.num_experts, P)
                                            : Placement::from_owners(cfg.placement, P);
        },
        "examoe::MoELayer::MoELayer: ");
    // 2. The config must be identical on every rank.
    check_same_config();

    E = cfg.num_experts;
    k = cfg.top_k;
    d = cfg.d_model;
    router = std::make_unique<impl::Router<Scalar>>(cfg, P, space, plan.readback());
    first_bad_slot = plan.readback().reserve<long long>(1);
    stats.tokens_per_expert.assign(E, 0);
    stats.dropped_per_expert.assign(E, 0);
    apply_placement(placement);
    experts = std::make_unique<impl::Experts<Scalar>>(cfg, nloc, space);
    init_parameters(cfg.router.seed);
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
    router->init_weights(seed);
    experts->init_weights(seed, placement, me);
    impl::host_sync(space);
  }

  /// Everything that depends on the placement except the expert tensors themselves.
  void apply_placement(const Placement& np) {
    placement = np;
    nloc = placement.num_local(me);
    plan.set_placement(space, placement, me);
    stats.rows_per_local_expert.assign(nloc, 0);
    have_forward = false;  // a plan built for the old placement is void
  }

  void set_placement(const Placement& np, std::vector<flat_vector>& state) {
    std::string err;
    if (np.num_experts() != E || np.num_ranks() != P)
      err = "examoe::MoELayer::set_placement: the placement is for " + std::to_string(np.num_experts()) +
            " experts on " + std::to_string(np.num_ranks()) + " ranks; the layer has " + std::to_string(E) +
            " experts on " + std::to_string(P) + " ranks";
    throw_if_any(*comm, err);
    const impl::MigrationPlan migration(placement, np, me);
    experts->migrate(migration, *coll, state);
    apply_placement(np);
    impl::host_sync(space);
  }

  // ------------------------------------------------------------------ checks
  /// Shape errors of forward's inputs, agreed over the statistics communicator so a bad
  /// rank does not leave the others waiting in a collective.
  void check_forward_shapes(const const_matrix& x, const matrix& out) {
    std::string err;
    if (x.extent(1) != static_cast<std::size_t>(d) || out.extent(1) != static_cast<std::size_t>(d) ||
        out.extent(0) != x.extent(0))
      err = "examoe::MoELayer::forward: expected x and out of shape [T][" + std::to_string(d) +
            "], got x [" + std::to_string(x.extent(0)) + "][" + std::to_string(x.extent(1)) +
            "] and out [" + std::to_string(out.extent(0)) + "][" + std::to_string(out.extent(1)) + "]";
    else if (static_cast<long long>(x.extent(0)) * k > INT_MAX / 2)
      err = "examoe::MoELayer::forward: T * top_k = " + std::to_string(x.extent(0) * k) +
            " assignments exceed the supported 2^30";
    throw_if_any(*scomm, err);
  }

  /// The same for backward's: a preceding forward, shapes of that forward's x.
  void check_backward_shapes(const const_matrix& dout, const matrix& dx) {
    std::string err;
    if (!have_forward)
      err = "examoe::MoELayer::backward: called without a preceding forward";
    else if (dout.extent(0) != static_cast<std::size_t>(T) || dout.extent(1) != static_cast<std::size_t>(d) ||
             dx.extent(0) != static_cast<std::size_t>(T) || dx.extent(1) != static_cast<std::size_t>(d))
      err = "examoe::MoELayer::backward: expected dout and dx of shape [" + std::to_string(T) +
            "][" + std::to_string(d) + "] (the last forward's x), got dout [" +
            std::to_string(dout.extent(0)) + "][" + std::to_string(dout.extent(1)) + "] and dx [" +
            std::to_string(dx.extent(0)) + "][" + std::to_string(dx.extent(1)) + "]";
    throw_if_any(*scomm, err);
  }

  /// Queues the search for v's first non-finite element into the readback (no wait).
  void queue_finite_check(const const_matrix& v) {
    impl::find_first_nonfinite(space, v, plan.readback().device<long long>(first_bad_slot));
  }

  /// After the readback's fetch: an error on every rank if any rank's v had a non-finite
  /// element, naming the first one (reading its value is the one extra wait, on error only).
  void agree_finite(const const_matrix& v, const char* fn, const char* name) {
    const long long first = plan.readback().host<long long>(first_bad_slot)(0);
    std::string err;
    if (first != LLONG_MAX) {
      const int n1 = static_cast<int>(v.extent(1));
      const int i = static_cast<int>(first / n1), j = static_cast<int>(first % n1);
      auto hv = impl::host_copy_of(Kokkos::subview(v, i, j));
      std::ostringstream os;
      os << "examoe::MoELayer::" << fn << ": " << name << " contains non-finite values (" << name << "(" << i
         << ", " << j << ") = " << static_cast<double>(hv()) << " on rank " << comm->rank()
         << " of the expert-parallel group); the inputs must be finite";
      err = os.str();
    }
    throw_if_any(*scomm, err);
  }

  // ------------------------------------------------------- the caller's work alongside
  const AlongsideWork* alongside = nullptr;  // of the running forward/backward; run once
  void run_alongside() {
    const AlongsideWork* work = alongside;
    alongside = nullptr;
    if (work && *work) (*work)();
  }

  // ------------------------------------------------------------------ forward
  void forward(const const_matrix& x, const matrix& out, bool training, const AlongsideWork& work) {
    alongside = &work;
    forward(x, out, training);
    run_alongside();  // not overlapped: after the layer's work
    alongside = nullptr;
    toc(Phase::experts);
  }
  void forward(const const_matrix& x, const matrix& out, bool training) {
    impl::kc::ScopedRegion region("examoe::MoELayer::forward");
    impl::CollectiveLabel label("moe.router");
    have_forward = false;  // until this forward completes, backward has nothing to reuse
    stats.seconds.fill(0);
    timer.clear();
    tic();
    check_forward_shapes(x, out);
    T = static_cast<int>(x.extent(0));
    A = T * k;
    x_saved = x;
    router->forward(x, training, *scomm);
    toc(Phase::router);

    // ---- plan: local sort by (owner rank, local expert); the layer's ONE wait brings the
    // counts, the router's sums and the finite check to the host together; then the global
    // router statistics, the counts exchange and the layout
    if (cfg.check_finite_inputs) queue_finite_check(x);
    plan.sort(space, router->topk());
    plan.fetch_counts(space);
    if (cfg.check_finite_inputs) agree_finite(x, "forward", "x");
    router->reduce_statistics(plan, placement, *scomm, stats);
    plan.exchange_counts(space, *comm);
    if (cfg.capacity_factor > 0) drop_over_capacity();
    record_plan_stats();
    toc(Phase::plan);
    if (cfg.dispatch_dtype == DispatchDtype::bf16)
      dispatch_experts_combine(bf16_rows, x, out);
    else
      dispatch_experts_combine(scalar_rows, x, out);
    have_forward = true;
  }

  /// Forward after the plan: rows out (in the wire type W), experts, rows back, combine.
  /// With overlap, the kept rows run while the dispatch travels (on GPUs their first projection,
  /// their second while the combine does: Experts, "the layer's stages"; docs/moe-layer.md).
  template <class W>
  void dispatch_experts_combine(impl::RowWorkspace<W>& rows, const const_matrix& x, const matrix& out) {
    using impl::ExpertRows;
    const bool overlap = overlapping();
    // ---- dispatch
    const int nrows = plan.expert_rows();
    const auto g = router->gates();
    rows.reserve_dispatch(plan, d);
    auto& xe = experts->inputs(nrows);
    impl::pack_rows(space, x, plan.perm(), k, plan.self_begin(), plan.self_count(), g, false,
                    impl::rows_of(rows.send, plan.rows_sent()));
    toc(Phase::pack);
    start_exchange("moe.dispatch", impl::Direction::forward, rows.send, rows.recv);
    if (overlap) {
      impl::gather_expert_rows(space, plan.blocks(), plan.num_blocks(), nrows, x, plan.perm(), k, g,
                               false, rows.recv, xe, ExpertRows::kept);
      experts->forward_kept(plan);
      run_alongside();
      coll->progress_alltoallv_rows();
      toc(Phase::experts);
    }
    finish_exchange("moe.dispatch");
    toc(Phase::alltoall);
    rows.reserve_combine(plan, d);
    const auto wire = wire_rows(rows);
    const ExpertRows arrived = overlap ? ExpertRows::received : ExpertRows::all;
    if (!wire || !overlap)  // the rows the experts do not read from the wire themselves
      impl::gather_expert_rows(space, plan.blocks(), plan.num_blocks(), nrows, x, plan.perm(), k, g, false,
                               rows.recv, xe, wire ? ExpertRows::kept : arrived);
    toc(Phase::pack);

    // ---- experts (the received rows, or all of them); by expert, in the layer's scalar, the
    // received rows from the receive buffer and their outputs into the combine's send buffer
    experts->forward_arrived(plan, arrived, wire ? &*wire : nullptr);
    toc(Phase::experts);

    // ---- combine
    if (!wire)
      impl::pack_back_rows(space, plan.blocks(), plan.num_blocks(), nrows, experts->outputs(), rows.back_send);
    start_exchange("moe.combine", impl::Direction::reverse, rows.back_send, rows.back_recv);
    if (overlap) {
      experts->forward_kept_rest(plan);
      coll->progress_alltoallv_rows();
      toc(Phase::experts);
    }
    finish_exchange("moe.combine");
    impl::combine_rows(space, plan.return_location(), k, g, true, experts->outputs(), rows.back_recv,
                       false, out);
    toc(Phase::combine);
  }

  /// The capacity (docs/moe-layer.md, "Capacity and token dropping"): the owners choose the
  /// kept assignments from the exchanged (gate, token) metadata, then the plan is laid out
  /// again over the kept ones only, so no dropped row is packed, sent or computed.
  void drop_over_capacity() {
    impl::CollectiveLabel label("moe.capacity");
    capacity.select(space, plan, router->gates(), *comm, cfg.capacity_factor);
    plan.drop(space, capacity.keep());
    plan.fetch_counts(space);
    plan.exchange_counts(space, *comm);
    capacity.reduce_dropped(placement, me, *scomm, stats.dropped_per_expert);
    stats.capacity = capacity.capacity();
  }

  /// Whether this step hides its exchanges behind the kept rows' work: asked for, and other
  /// ranks to exchange with.
  bool overlapping() const { return cfg.overlap_exchange && P > 1; }

  /// The dispatch statistics of this step's plan.
  void record_plan_stats() {
    stats.ranks_per_token = T > 0 ? static_cast<double>(plan.destination_ranks(false)) / T : 0.0;
    stats.max_ranks_per_token = plan.destination_ranks(true);
    for (int lx = 0; lx < nloc; ++lx)
      stats.rows_per_local_expert[lx] = plan.expert_row_begin(lx + 1) - plan.expert_row_begin(lx);
    stats.rows_per_block.assign(static_cast<std::size_t>(nloc) * P, 0);
    for (int lx = 0; lx < nloc; ++lx)
      for (int src = 0; src < P; ++src) stats.rows_per_block[static_cast<std::size_t>(lx) * P + src] = plan.recv_count(src, lx);
    const std::int64_t row_bytes =
        static_cast<std::int64_t>(d) * (cfg.dispatch_dtype == DispatchDtype::bf16 ? sizeof(impl::bf16) : sizeof(Scalar));
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

  /// The exchange's buffers the experts read the received rows from and write their results
  /// into (Experts::WireRows): by expert (the host schedule), with rows on the wire in the
  /// layer's scalar. None otherwise: the layer regroups the rows (gather_expert_rows) and packs
  /// the results (pack_back_rows).
  template <class W>
  std::optional<typename impl::Experts<Scalar>::WireRows> wire_rows(const impl::RowWorkspace<W>& rows) const {
    if constexpr (std::is_same<W, Scalar>::value)
      if (experts->by_expert()) return typename impl::Experts<Scalar>::WireRows{rows.recv, rows.back_send};
    return std::nullopt;
  }

  /// Starts ONE variable-size all-to-all of rows through the plan: in the dispatch direction
  /// (forward), or the combine direction (reverse: the same counts, send and receive swapped).
  template <class M>
  void start_exchange(const char* label, impl::Direction dir, const M& send, const M& recv) {
    impl::CollectiveLabel scope(label);
    impl::start_exchange_rows(*coll, plan.exchange(), dir, send.data(), recv.data(), d);
  }
  /// Completes it: its received rows may be read after this.
  void finish_exchange(const char* label) {
    impl::CollectiveLabel scope(label);
    impl::finish_exchange_rows(*coll);
  }

  // ----------------------------------------------------------------- backward
  void backward(const const_matrix& dout, const matrix& dx, const AlongsideWork& work) {
    alongside = &work;
    backward(dout, dx);
    run_alongside();  // not overlapped: after the layer's work
    alongside = nullptr;
    toc(Phase::bwd_experts);
  }
  void backward(const const_matrix& dout, const matrix& dx) {
    impl::kc::ScopedRegion region("examoe::MoELayer::backward");
    impl::CollectiveLabel label("moe.backward");
    check_backward_shapes(dout, dx);
    if (cfg.check_finite_inputs) {  // a guard that costs one wait; the trainer turns it off
      queue_finite_check(dout);
      plan.readback().fetch(space);
      agree_finite(dout, "backward", "dout");
    }
    tic();
    if (cfg.dispatch_dtype == DispatchDtype::bf16)
      backward_rows(bf16_rows, dout, dx);
    else
      backward_rows(scalar_rows, dout, dx);
  }

  /// Backward through the forward's plan, rows in the wire type W. With overlap, the kept
  /// rows run while dy travels (on GPUs their da; their dxe and every weight gradient while
  /// dxe travels: Experts, "the layer's stages").
  template <class W>
  void backward_rows(impl::RowWorkspace<W>& rows, const const_matrix& dout, const matrix& dx) {
    using impl::ExpertRows;
    const bool overlap = overlapping();
    const auto g = router->gates();
    const auto dg = router->gate_grads();
    const int nrows = plan.expert_rows();
    auto& dye = experts->output_grads(nrows);
    // ---- combine^T: gate gradients, then dy = gate * dout dispatched like x
    impl::gate_grads(space, plan.return_location(), k, experts->outputs(), rows.back_recv, dout, dg);
    impl::pack_rows(space, dout, plan.perm(), k, plan.self_begin(), plan.self_count(), g, true,
                    impl::rows_of(rows.send, plan.rows_sent()));
    toc(Phase::bwd_combine);
    start_exchange("moe.combine_bwd", impl::Direction::forward, rows.send, rows.recv);
    if (overlap) {
      impl::gather_expert_rows(space, plan.blocks(), plan.num_blocks(), nrows, dout, plan.perm(), k, g,
                               true, rows.recv, dye, ExpertRows::kept);
      experts->backward_kept(plan);
      run_alongside();
      coll->progress_alltoallv_rows();
      toc(Phase::bwd_experts);
    }
    finish_exchange("moe.combine_bwd");
    toc(Phase::bwd_alltoall);
    const auto wire = wire_rows(rows);
    const ExpertRows arrived = overlap ? ExpertRows::received : ExpertRows::all;
    if (!wire || !overlap)  // as forward's
      impl::gather_expert_rows(space, plan.blocks(), plan.num_blocks(), nrows, dout, plan.perm(), k, g, true,
                               rows.recv, dye, wire ? ExpertRows::kept : arrived);
    toc(Phase::bwd_combine);

    // ---- experts (the received rows, or all of them; their dye and dxe as forward's rows)
    experts->backward_arrived(plan, arrived, wire ? &*wire : nullptr);
    toc(Phase::bwd_experts);

    // ---- dispatch^T: dx rows go home
    if (!wire)
      impl::pack_back_rows(space, plan.blocks(), plan.num_blocks(), nrows, experts->input_grads(), rows.back_send);
    start_exchange("moe.dispatch_bwd", impl::Direction::reverse, rows.back_send, rows.back_recv);
    if (overlap) {
      experts->backward_rest(plan, true);
      coll->progress_alltoallv_rows();
      toc(Phase::bwd_experts);
    }
    finish_exchange("moe.dispatch_bwd");
    toc(Phase::bwd_alltoall);
    if (!overlap) {
      experts->backward_rest(plan, false);
      toc(Phase::bwd_experts);
    }

    // ---- router backward, then the expert rows' part of dx
    router->backward(x_saved, cfg.reduce_router_grad ? coll.get() : nullptr, dx);
    impl::combine_rows(space, plan.return_location(), k, g, false, experts->input_grads(),
                       rows.back_recv, true, dx);
    toc(Phase::bwd_router);
  }
};

// ------------------------------------------------------------------- MoELayer
RouterSums& RouterSums::operator+=(const RouterSums& o) {
  if (assignments.empty()) assignments.assign(o.assignments.size(), 0.0);
  if (probabilities.empty()) probabilities.assign(o.probabilities.size(), 0.0);
  if (assignments.size() != o.assignments.size() || probabilities.size() != o.probabilities.size())
    throw Error("examoe::RouterSums: adding sums of " + std::to_string(o.assignments.size()) + " experts to sums of " +
                std::to_string(assignments.size()));
  for (std::size_t e = 0; e < assignments.size(); ++e) assignments[e] += o.assignments[e];
  for (std::size_t e = 0; e < probabilities.size(); ++e) probabilities[e] += o.probabilities[e];
  lse_squares += o.lse_squares;
  tokens += o.tokens;
  return *this;
}

template <class S>
MoELayer<S>::MoELayer(const MoEConfig& config, const MoELayerOptions& options)
    : impl_(std::make_unique<Impl>(config, options)) {}
template <class S>
MoELayer<S>::MoELayer(const MoEConfig& config, MPI_Comm comm) {
  MoELayerOptions options;
  options.comm = comm;
  impl_ = std::make_unique<Impl>(config, options);
}
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
  impl_->router->set_step(step);
}
template <class S>
void MoELayer<S>::set_token_offset(std::int64_t first) {
  impl_->router->set_token_offset(first);
}
template <class S>
const RouterSums& MoELayer<S>::router_sums() const {
  return impl_->router->sums();
}
template <class S>
void MoELayer<S>::set_step_router_sums(const RouterSums& sums) {
  const std::size_t E = static_cast<std::size_t>(impl_->E);
  if (sums.assignments.size() != E || sums.probabilities.size() != E)
    throw Error("examoe::MoELayer::set_step_router_sums: sums of " + std::to_string(sums.assignments.size()) + " and " +
                std::to_string(sums.probabilities.size()) + " experts for a layer of " + std::to_string(E));
  impl_->router->set_step_sums(&sums);
}
template <class S>
void MoELayer<S>::clear_step_router_sums() {
  impl_->router->set_step_sums(nullptr);
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
void MoELayer<S>::forward(const const_matrix& x, const matrix& out, bool training, const AlongsideWork& alongside) {
  impl_->forward(x, out, training, alongside);
}
template <class S>
void MoELayer<S>::backward(const const_matrix& dout, const matrix& dx, const AlongsideWork& alongside) {
  impl_->backward(dout, dx, alongside);
}
template <class S>
void MoELayer<S>::zero_grad() {
  impl_->router->zero_grad();
  impl_->experts->zero_grad();
}
template <class S>
RouterLosses MoELayer<S>::losses() const { return impl_->router->losses(); }
template <class S>
void MoELayer<S>::update_router_bias() { impl_->router->update_bias(); }
template <class S>
void MoELayer<S>::discard_router_loads() { impl_->router->discard_loads(); }
template <class S>
const std::vector<double>& MoELayer<S>::router_bias() const { return impl_->router->bias(); }
template <class S>
void MoELayer<S>::set_router_bias(const std::vector<double>& bias) { impl_->router->set_bias(bias); }
template <class S>
const LayerStats& MoELayer<S>::stats() const { return impl_->current_stats(); }
template <class S>
const Placement& MoELayer<S>::placement() const { return impl_->placement; }
template <class S>
const MoEConfig& MoELayer<S>::config() const { return impl_->cfg; }
template <class S>
Communicator& MoELayer<S>::communicator() { return *impl_->comm; }
template <class S>
auto MoELayer<S>::space() const -> const execution_space& { return impl_->space; }
template <class S>
auto MoELayer<S>::router_weight() const -> matrix { return impl_->router->weight(); }
template <class S>
auto MoELayer<S>::router_grad() const -> matrix { return impl_->router->grad(); }
template <class S>
auto MoELayer<S>::w1() const -> tensor3 { return impl_->experts->weights(ExpertTensor::w1); }
template <class S>
auto MoELayer<S>::w2() const -> tensor3 { return impl_->experts->weights(ExpertTensor::w2); }
template <class S>
auto MoELayer<S>::w3() const -> tensor3 { return impl_->experts->weights(ExpertTensor::w3); }
template <class S>
auto MoELayer<S>::w1_grad() const -> tensor3 { return impl_->experts->grads(ExpertTensor::w1); }
template <class S>
auto MoELayer<S>::w2_grad() const -> tensor3 { return impl_->experts->grads(ExpertTensor::w2); }
template <class S>
auto MoELayer<S>::w3_grad() const -> tensor3 { return impl_->experts->grads(ExpertTensor::w3); }
template <class S>
auto MoELayer<S>::weights(ExpertTensor t) const -> tensor3 {
  return impl_->experts->weights(t);
}
template <class S>
auto MoELayer<S>::weight_grads(ExpertTensor t) const -> tensor3 {
  return impl_->experts->grads(t);
}
template <class S>
std::vector<ExpertTensor> MoELayer<S>::expert_tensors() const {
  if (impl_->cfg.activation == Activation::swiglu) return {ExpertTensor::w1, ExpertTensor::w2, ExpertTensor::w3};
  return {ExpertTensor::w1, ExpertTensor::w2};
}
template <class S>
int MoELayer<S>::num_local_experts() const { return impl_->nloc; }
template <class S>
auto MoELayer<S>::topk_experts() const -> Kokkos::View<int**, Kokkos::LayoutRight, memory_space> {
  return impl_->router->topk();
}
template <class S>
auto MoELayer<S>::gates() const -> matrix {
  return impl_->router->gates();
}
template <class S>
std::int64_t MoELayer<S>::workspace_allocations() const {
  return impl_->scalar_rows.ws.allocations() + impl_->bf16_rows.ws.allocations() + impl_->plan.workspace_allocations() +
         impl_->router->workspace_allocations() + impl_->experts->workspace_allocations() +
         impl_->capacity.workspace_allocations();
}

template class MoELayer<float>;
template class MoELayer<double>;

}  // namespace examoe
