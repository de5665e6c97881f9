// An "existing scientific code" that owns MPI and Kokkos and hands ExaMoE a communicator.
//
// The world is split in two groups. Group 0 trains an MoE layer on its sub-communicator
// (forward, backward, one AdamW step, and checks that the loss went down); group 1 meanwhile
// does unrelated MPI work of its own (a ring exchange and reductions). Through the MPI
// profiling interface this program watches every MPI call ExaMoE makes and checks that the
// library never calls MPI_Init/MPI_Finalize and never uses MPI_COMM_WORLD, and that Kokkos,
// initialised here, is still initialised after the library is gone.
//
// Run: mpiexec -n 4 ./host_mpi_code
#include <examoe/examoe.hpp>
#include <examoe/optimizer.hpp>

#include <Kokkos_Core.hpp>
#include <mpi.h>

#include <cmath>
#include <cstdio>
#include <vector>

// ---------------------------------------------------------------- MPI call watch
namespace watch {
bool in_library = false;     // set around every call into ExaMoE
long long library_calls = 0;  // MPI calls made from inside ExaMoE
long long world_uses = 0;     // ... of them on MPI_COMM_WORLD
long long init_finalize = 0;  // MPI_Init*/MPI_Finalize from inside ExaMoE
inline void seen(MPI_Comm c) {
  if (!in_library) return;
  ++library_calls;
  if (c == MPI_COMM_WORLD) ++world_uses;
}
struct Scope {
  Scope() { in_library = true; }
  ~Scope() { in_library = false; }
};
}  // namespace watch

extern "C" {
int MPI_Init(int* argc, char*** argv) {
  if (watch::in_library) ++watch::init_finalize;
  return PMPI_Init(argc, argv);
}
int MPI_Init_thread(int* argc, char*** argv, int req, int* prov) {
  if (watch::in_library) ++watch::init_finalize;
  return PMPI_Init_thread(argc, argv, req, prov);
}
int MPI_Finalize(void) {
  if (watch::in_library) ++watch::init_finalize;
  return PMPI_Finalize();
}
int MPI_Comm_dup(MPI_Comm c, MPI_Comm* n) { watch::seen(c); return PMPI_Comm_dup(c, n); }
int MPI_Comm_split(MPI_Comm c, int color, int key, MPI_Comm* n) {
  watch::seen(c);
  return PMPI_Comm_split(c, color, key, n);
}
int MPI_Comm_rank(MPI_Comm c, int* r) { watch::seen(c); return PMPI_Comm_rank(c, r); }
int MPI_Comm_size(MPI_Comm c, int* s) { watch::seen(c); return PMPI_Comm_size(c, s); }
int MPI_Barrier(MPI_Comm c) { watch::seen(c); return PMPI_Barrier(c); }
int MPI_Bcast(void* b, int n, MPI_Datatype t, int root, MPI_Comm c) {
  watch::seen(c);
  return PMPI_Bcast(b, n, t, root, c);
}
int MPI_Allreduce(const void* s, void* r, int n, MPI_Datatype t, MPI_Op op, MPI_Comm c) {
  watch::seen(c);
  return PMPI_Allreduce(s, r, n, t, op, c);
}
int MPI_Exscan(const void* s, void* r, int n, MPI_Datatype t, MPI_Op op, MPI_Comm c) {
  watch::seen(c);
  return PMPI_Exscan(s, r, n, t, op, c);
}
int MPI_Allgather(const void* s, int sn, MPI_Datatype st, void* r, int rn, MPI_Datatype rt, MPI_Comm c) {
  watch::seen(c);
  return PMPI_Allgather(s, sn, st, r, rn, rt, c);
}
int MPI_Alltoall(const void* s, int sn, MPI_Datatype st, void* r, int rn, MPI_Datatype rt, MPI_Comm c) {
  watch::seen(c);
  return PMPI_Alltoall(s, sn, st, r, rn, rt, c);
}
int MPI_Alltoallv(const void* s, const int sc[], const int sd[], MPI_Datatype st, void* r,
                  const int rc[], const int rd[], MPI_Datatype rt, MPI_Comm c) {
  watch::seen(c);
  return PMPI_Alltoallv(s, sc, sd, st, r, rc, rd, rt, c);
}
int MPI_Reduce_scatter_block(const void* s, void* r, int n, MPI_Datatype t, MPI_Op op, MPI_Comm c) {
  watch::seen(c);
  return PMPI_Reduce_scatter_block(s, r, n, t, op, c);
}
}

// ---------------------------------------------------------------- the two groups
namespace {
using Mat = examoe::MoELayer<double>::matrix;

/// L = 0.5 |y - target|^2 / T_global; returns the global loss and writes dL/dy.
double loss_and_grad(const Mat& y, const Mat& target, const Mat& dy, MPI_Comm comm) {
  auto hy = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), y);
  auto ht = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), target);
  auto hd = Kokkos::create_mirror_view(dy);
  double T = static_cast<double>(y.extent(0)), l = 0;
  MPI_Allreduce(MPI_IN_PLACE, &T, 1, MPI_DOUBLE, MPI_SUM, comm);
  for (std::size_t t = 0; t < y.extent(0); ++t)
    for (std::size_t c = 0; c < y.extent(1); ++c) {
      const double r = hy(t, c) - ht(t, c);
      l += 0.5 * r * r / T;
      hd(t, c) = r / T;
    }
  Kokkos::deep_copy(dy, hd);
  MPI_Allreduce(MPI_IN_PLACE, &l, 1, MPI_DOUBLE, MPI_SUM, comm);
  return l;
}

int moe_group(MPI_Comm comm) {
  int rank = 0;
  MPI_Comm_rank(comm, &rank);
  const int d = 16, T = 48;
  Mat x("x", T, d), y("y", T, d), target("target", T, d), dy("dy", T, d), dx("dx", T, d);
  {
    auto hx = Kokkos::create_mirror_view(x);
    auto ht = Kokkos::create_mirror_view(target);
    for (int t = 0; t < T; ++t)
      for (int c = 0; c < d; ++c) {
        hx(t, c) = std::cos(0.37 * (t + T * rank) + 0.11 * c);
        ht(t, c) = 0.5 * std::sin(0.21 * (t + T * rank) - 0.07 * c);
      }
    Kokkos::deep_copy(x, hx);
    Kokkos::deep_copy(target, ht);
  }
  double before = 0, after = 0;
  {
    watch::Scope in;  // from here on, every MPI call is the library's
    examoe::MoEConfig cfg;
    cfg.d_model = d;
    cfg.d_hidden = 32;
    cfg.num_experts = 4;
    cfg.top_k = 2;
    cfg.activation = examoe::Activation::swiglu;
    examoe::MoELayer<double> layer(cfg, comm);
    layer.forward(x, y);
    watch::in_library = false;
    before = loss_and_grad(y, target, dy, comm);
    watch::in_library = true;
    layer.backward(dy, dx);
    // One AdamW step on the router and the local experts.
    examoe::AdamWConfig ac;
    ac.weight_decay = 0.0;
    examoe::AdamW<double> opt(ac);
    using U = examoe::AdamW<double>::vector;
    auto add = [&](auto p, auto g) { if (p.size() > 0) opt.add(U(p.data(), p.size()), U(g.data(), g.size()), U(), false); };
    add(layer.router_weight(), layer.router_grad());
    add(layer.w1(), layer.w1_grad());
    add(layer.w2(), layer.w2_grad());
    add(layer.w3(), layer.w3_grad());
    opt.step(1e-2, 1.0);
    layer.forward(x, y);
    watch::in_library = false;
    after = loss_and_grad(y, target, dy, comm);
    watch::in_library = true;
  }  // the layer (and its duplicated communicator) is destroyed inside the watched scope
  int bad = 0;
  if (!(after < before)) {
    std::printf("host: loss did not decrease after one step: %.6g -> %.6g\n", before, after);
    bad = 1;
  }
  if (rank == 0)
    std::printf("host: MoE group trained one step on its own communicator: loss %.6g -> %.6g\n",
                before, after);
  return bad;
}

int other_group(MPI_Comm comm) {
  // Unrelated work: a ring exchange and a reduction, checked against closed forms.
  int rank = 0, size = 1;
  MPI_Comm_rank(comm, &rank);
  MPI_Comm_size(comm, &size);
  int bad = 0;
  for (int it = 0; it < 50; ++it) {
    double mine = rank + it, left = -1;
    MPI_Sendrecv(&mine, 1, MPI_DOUBLE, (rank + 1) % size, 7, &left, 1, MPI_DOUBLE,
                 (rank + size - 1) % size, 7, comm, MPI_STATUS_IGNORE);
    bad |= left != ((rank + size - 1) % size) + it;
    double sum = mine;
    MPI_Allreduce(MPI_IN_PLACE, &sum, 1, MPI_DOUBLE, MPI_SUM, comm);
    bad |= sum != size * (size - 1) / 2.0 + size * it;
  }
  if (rank == 0) std::printf("host: the other group did its own MPI work: %s\n", bad ? "WRONG" : "ok");
  return bad;
}
}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  Kokkos::initialize(argc, argv);  // the host owns Kokkos too
  int wrank = 0, wsize = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &wrank);
  MPI_Comm_size(MPI_COMM_WORLD, &wsize);
  const int color = wsize > 1 && wrank >= wsize / 2 ? 1 : 0;
  MPI_Comm group;
  MPI_Comm_split(MPI_COMM_WORLD, color, wrank, &group);
  int bad = color == 0 ? moe_group(group) : other_group(group);
  if (color == 0) {
    if (watch::library_calls == 0) {
      std::printf("host: the MPI watch saw no library call: the check would be vacuous\n");
      bad = 1;
    }
    if (watch::world_uses != 0 || watch::init_finalize != 0) {
      std::printf("host: ExaMoE used MPI_COMM_WORLD %lld times and MPI_Init/Finalize %lld times\n",
                  watch::world_uses, watch::init_finalize);
      bad = 1;
    }
  }
  if (!Kokkos::is_initialized()) {
    std::printf("host: Kokkos was finalized behind the host's back\n");
    bad = 1;
  }
  long long calls = watch::library_calls;
  MPI_Allreduce(MPI_IN_PLACE, &calls, 1, MPI_LONG_LONG, MPI_SUM, MPI_COMM_WORLD);
  MPI_Allreduce(MPI_IN_PLACE, &bad, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  if (wrank == 0)
    std::printf("host: %lld MPI calls by ExaMoE, none on MPI_COMM_WORLD, no MPI_Init/Finalize: %s\n",
                calls, bad ? "FAILED" : "OK");
  MPI_Comm_free(&group);
  Kokkos::finalize();
  MPI_Finalize();
  return bad;
}
