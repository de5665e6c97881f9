// Built against an installed ExaMoE through find_package(ExaMoE): one MoE layer forward and
// backward on MPI_COMM_WORLD, checked against the layer's own invariants.
#include <examoe/examoe.hpp>

#include <Kokkos_Core.hpp>
#include <mpi.h>

#include <cmath>
#include <cstdio>

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  Kokkos::initialize(argc, argv);
  int bad = 0;
  {
    int rank = 0, size = 1;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    examoe::MoEConfig cfg;
    cfg.d_model = 32;
    cfg.d_hidden = 64;
    cfg.num_experts = 4;
    cfg.top_k = 2;
    examoe::MoELayer<double> layer(cfg, MPI_COMM_WORLD);
    const int T = 64;
    using Mat = examoe::MoELayer<double>::matrix;
    Mat x("x", T, 32), y("y", T, 32), dy("dy", T, 32), dx("dx", T, 32);
    auto h = Kokkos::create_mirror_view(x);
    for (int t = 0; t < T; ++t)
      for (int c = 0; c < 32; ++c) h(t, c) = std::sin(0.1 * (t + 7 * rank) + 0.3 * c);
    Kokkos::deep_copy(x, h);
    Kokkos::deep_copy(dy, 1.0);
    layer.forward(x, y);
    layer.backward(dy, dx);
    auto hy = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), y);
    double norm = 0;
    for (int t = 0; t < T; ++t)
      for (int c = 0; c < 32; ++c) norm += hy(t, c) * hy(t, c);
    const auto& st = layer.stats();
    bad = !(std::isfinite(norm) && norm > 0) ||
          st.bytes_sent_dispatch != st.rows_sent * 32 * static_cast<long long>(sizeof(double)) ||
          st.assignments != 2 * T;
    long long sent = st.rows_sent, recv = st.rows_received;
    MPI_Allreduce(MPI_IN_PLACE, &sent, 1, MPI_LONG_LONG, MPI_SUM, MPI_COMM_WORLD);
    MPI_Allreduce(MPI_IN_PLACE, &recv, 1, MPI_LONG_LONG, MPI_SUM, MPI_COMM_WORLD);
    bad |= sent != recv;
    MPI_Allreduce(MPI_IN_PLACE, &bad, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
    if (rank == 0)
      std::printf("consumer: ExaMoE %s on %d ranks, |y|^2 = %.6g, rows exchanged %lld: %s\n",
                  EXAMOE_VERSION_STRING, size, norm, sent, bad ? "FAILED" : "OK");
  }
  Kokkos::finalize();
  MPI_Finalize();
  return bad;
}
