// The counted structure of a layer step (impl/host_sync.hpp): host synchronisations and GEMM
// calls per forward and backward, on the code path a CUDA + NCCL build takes and on the MPI
// path, through many steps of random token counts (zero included) at 1-4 ranks. The counts
// are what a device build makes: on this host build every fence is free, but each is counted.
//
// The NCCL path is taken here with a stream-ordered communicator: MPI underneath, but it says
// what NCCL says (the data collectives are ordered on the execution space's stream, so the
// layer must not fence before them). Its results must equal the plain MPI layer's, bitwise.
#include "test_util.hpp"

#include <examoe/impl/host_sync.hpp>

#include <memory>
#include <random>
#include <string>
#include <vector>

namespace examoe::test {
namespace {

/// MPI underneath, stream-ordered like NCCL.
class StreamOrderedMpi final : public Communicator {
 public:
  explicit StreamOrderedMpi(MPI_Comm c) : mpi_(make_mpi_communicator(c)) {}
  int rank() const override { return mpi_->rank(); }
  int size() const override { return mpi_->size(); }
  std::string backend() const override { return "stream-ordered mpi (test)"; }
  bool stream_ordered() const override { return true; }
  void alltoall_int(const int* s, int* r, int n) override { mpi_->alltoall_int(s, r, n); }
  void alltoallv_rows(const void* s, const int* sc, const int* sd, void* r, const int* rc, const int* rd,
                      int row_elems, DataType t, Memory m) override {
    mpi_->alltoallv_rows(s, sc, sd, r, rc, rd, row_elems, t, m);
  }
  void start_alltoallv_rows(const void* s, const int* sc, const int* sd, void* r, const int* rc, const int* rd,
                            int row_elems, DataType t, Memory m) override {
    mpi_->start_alltoallv_rows(s, sc, sd, r, rc, rd, row_elems, t, m);
  }
  void progress_alltoallv_rows() override { mpi_->progress_alltoallv_rows(); }
  void finish_alltoallv_rows() override { mpi_->finish_alltoallv_rows(); }
  void allreduce_sum(void* b, std::size_t n, DataType t, Memory m) override { mpi_->allreduce_sum(b, n, t, m); }
  void allgather(const void* s, void* r, std::size_t n, DataType t, Memory m) override {
    mpi_->allgather(s, r, n, t, m);
  }
  void reduce_scatter_sum(const void* s, void* r, std::size_t n, DataType t, Memory m) override {
    mpi_->reduce_scatter_sum(s, r, n, t, m);
  }
  std::string first_error(const std::string& e) override { return mpi_->first_error(e); }
  void broadcast(void* b, std::size_t n, int root) override { mpi_->broadcast(b, n, root); }
  long long exscan_sum(long long v) override { return mpi_->exscan_sum(v); }
  void barrier() override { mpi_->barrier(); }
  MPI_Comm mpi_comm() const override { return mpi_->mpi_comm(); }

 private:
  std::unique_ptr<Communicator> mpi_;
};

using Layer = MoELayer<double>;

std::unique_ptr<Layer> make_layer(const MoEConfig& cfg, bool stream_ordered) {
  MoELayerOptions o;
  if (stream_ordered)
    o.shared_comm = std::make_shared<StreamOrderedMpi>(MPI_COMM_WORLD);
  else
    o.comm = MPI_COMM_WORLD;
  return std::make_unique<Layer>(cfg, o);
}

struct StepCounts {
  impl::WorkCounts forward, backward;
};

StepCounts run_step(Layer& layer, const Matrix<double>& x, const Matrix<double>& out,
                    const Matrix<double>& dout, const Matrix<double>& dx) {
  StepCounts c;
  layer.zero_grad();
  const impl::WorkCounts t0 = impl::work_counts();
  layer.forward(x, out);
  const impl::WorkCounts t1 = impl::work_counts();
  layer.backward(dout, dx);
  const impl::WorkCounts t2 = impl::work_counts();
  c.forward = t1 - t0;
  c.backward = t2 - t1;
  return c;
}

/// Projections of the experts: forward x W1 (x W3), a W2; backward two per forward GEMM
/// (the input gradient and the weight gradient).
int expert_projections(const MoEConfig& cfg) { return cfg.activation == Activation::swiglu ? 3 : 2; }

struct Expected {
  int fwd_syncs, bwd_syncs;
};

/// One layer of each path through `steps` random steps; every step's counts against
/// `nccl_path` / `mpi_path`, and every result of the stream-ordered layer against the MPI one.
void check_counts(MoEConfig cfg, Expected nccl_path, Expected mpi_path, int steps = 12) {
  const int P = world_size(), me = world_rank();
  auto so = make_layer(cfg, true);
  auto mpi = make_layer(cfg, false);
  std::mt19937 rng(77);  // the same stream on every rank
  const int d = cfg.d_model;
  for (int s = 0; s < steps; ++s) {
    SCOPED_TRACE("step " + std::to_string(s));
    // Ragged, skewed and empty ranks: 0, 1 or up to 40 tokens, drawn for every rank.
    std::vector<int> T(P);
    for (int r = 0; r < P; ++r) {
      const int kind = static_cast<int>(rng() % 4);
      T[r] = kind == 0 ? 0 : kind == 1 ? 1 : static_cast<int>(rng() % 40);
    }
    Rng vals(1000 + 31 * s + me);
    auto random_matrix = [&](int n, const char* label) {
      std::vector<double> v(static_cast<std::size_t>(n) * d);
      for (auto& a : v) a = vals.uniform(-1, 1);
      return make_matrix<double>(v, 0, n, d, label);
    };
    const auto x = random_matrix(T[me], "x"), dout = random_matrix(T[me], "dout");
    Matrix<double> out1("out1", T[me], d), dx1("dx1", T[me], d), out2("out2", T[me], d), dx2("dx2", T[me], d);
    const StepCounts a = run_step(*so, x, out1, dout, dx1);
    const StepCounts b = run_step(*mpi, x, out2, dout, dx2);

    EXPECT_EQ(a.forward.host_syncs, nccl_path.fwd_syncs) << "forward, stream-ordered (NCCL) path";
    EXPECT_EQ(a.backward.host_syncs, nccl_path.bwd_syncs) << "backward, stream-ordered (NCCL) path";
    EXPECT_EQ(b.forward.host_syncs, mpi_path.fwd_syncs) << "forward, MPI path";
    EXPECT_EQ(b.backward.host_syncs, mpi_path.bwd_syncs) << "backward, MPI path";
    // GEMM calls: the router's one, then one per projection for all local experts together;
    // with overlap (and other ranks), the row projections run in two calls, kept rows and
    // received rows, and the weight gradients in one. By expert, these small experts are
    // visited once per direction (their weights fit in cache): one call per projection.
    const bool split = cfg.overlap_exchange && P > 1 && cfg.expert_schedule != ExpertSchedule::by_expert;
    const int proj = expert_projections(cfg), calls = split ? 2 : 1;
    EXPECT_EQ(a.forward.gemm_calls, 1 + calls * proj);
    EXPECT_EQ(a.backward.gemm_calls, (T[me] > 0 ? 2 : 1) + (calls + 1) * proj);  // dWr (when T > 0), dx
    EXPECT_EQ(b.forward.gemm_calls, a.forward.gemm_calls);
    EXPECT_EQ(b.backward.gemm_calls, a.backward.gemm_calls);

    EXPECT_EQ(to_host(out1), to_host(out2));
    EXPECT_EQ(to_host(dx1), to_host(dx2));
    EXPECT_EQ(to_host(so->router_grad()), to_host(mpi->router_grad()));
    EXPECT_EQ(to_host(so->w1_grad()), to_host(mpi->w1_grad()));
    EXPECT_EQ(to_host(so->w2_grad()), to_host(mpi->w2_grad()));
    EXPECT_EQ(so->losses().aux, mpi->losses().aux);
  }
}

MoEConfig config(Activation act) {
  MoEConfig cfg = small_config(6, 2, act, 8, 12);
  cfg.check_finite_inputs = false;  // the trainer's setting
  cfg.time_phases = false;          // the library's default
  cfg.expert_schedule = ExpertSchedule::by_projection;  // the experts' schedule of a CUDA build
  return cfg;
}

// The trainer's layer: on a CUDA + NCCL build, ONE wait per forward (the plan's counts, the
// router's sums and the finite flags in one copy) and none in backward. On the MPI path, one
// more before each data collective (MPI reads the buffers when called): the two exchanges of
// forward; in backward the two exchanges and the router-gradient allreduce.
TEST(HostSyncs, OneWaitPerForwardNoneInBackward) {
  check_counts(config(Activation::gelu), {1, 0}, {3, 3});
}
TEST(HostSyncs, SwiGLU) { check_counts(config(Activation::swiglu), {1, 0}, {3, 3}); }

// The host backends' schedule (expert by expert, in row chunks): the same waits, and its GEMM
// calls counted as the grouped calls they stand for.
TEST(HostSyncs, ExpertByExpert) {
  for (Activation act : {Activation::gelu, Activation::swiglu}) {
    MoEConfig cfg = config(act);
    cfg.expert_schedule = ExpertSchedule::by_expert;
    check_counts(cfg, {1, 0}, {3, 3});
    cfg.overlap_exchange = false;
    check_counts(cfg, {1, 0}, {3, 3});
  }
}

// Phase timing adds no wait: host clocks here, CUDA events on the stream on GPUs.
TEST(HostSyncs, PhaseTimingAddsNoWait) {
  MoEConfig cfg = config(Activation::gelu);
  cfg.time_phases = true;
  check_counts(cfg, {1, 0}, {3, 3});
}

// The library's finite-input guard rides in forward's copy; in backward it costs one wait.
TEST(HostSyncs, FiniteChecksRideInForwardsCopy) {
  MoEConfig cfg = config(Activation::gelu);
  cfg.check_finite_inputs = true;
  check_counts(cfg, {1, 1}, {3, 4});
}

// Overlap off: every exchange completes before the experts run; the same waits, one GEMM call
// per projection.
TEST(HostSyncs, OverlapOff) {
  MoEConfig cfg = config(Activation::swiglu);
  cfg.overlap_exchange = false;
  check_counts(cfg, {1, 0}, {3, 3});
}

// Without the router-gradient allreduce (FSDP reduces it), backward on MPI waits twice.
TEST(HostSyncs, NoRouterReduce) {
  MoEConfig cfg = config(Activation::gelu);
  cfg.reduce_router_grad = false;
  check_counts(cfg, {1, 0}, {3, 2});
}

}  // namespace
}  // namespace examoe::test
