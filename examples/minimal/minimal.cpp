// The smallest use of ExaMoE: one MoE layer on the caller's communicator, forward and
// backward. Run: mpiexec -n 2 ./build/examples/minimal/examoe_minimal
#include <examoe/examoe.hpp>

#include <Kokkos_Core.hpp>
#include <mpi.h>

#include <cstdio>

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  Kokkos::initialize(argc, argv);
  {
    int rank = 0;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);

    examoe::MoEConfig cfg;
    cfg.d_model = 64;
    cfg.d_hidden = 256;
    cfg.num_experts = 4;
    cfg.top_k = 2;
    cfg.activation = examoe::Activation::swiglu;
    // The layer works on its own duplicate of the communicator it is given.
    examoe::MoELayer<float> layer(cfg, MPI_COMM_WORLD);

    const int T = 128 + 32 * rank;  // token counts may differ between ranks
    using Mat = examoe::MoELayer<float>::matrix;
    Mat x("x", T, cfg.d_model), y("y", T, cfg.d_model), dy("dy", T, cfg.d_model),
        dx("dx", T, cfg.d_model);
    Kokkos::parallel_for("fill", T, KOKKOS_LAMBDA(const int t) {
      for (int c = 0; c < 64; ++c) x(t, c) = 0.01f * ((t * 7 + c * 3) % 13 - 6);
    });
    Kokkos::deep_copy(dy, 1.0f / T);

    layer.forward(x, y);
    layer.backward(dy, dx);

    const auto& st = layer.stats();
    std::printf("rank %d: %d tokens, %lld rows sent, %lld rows for my %d experts, aux %.4g, z %.4g\n",
                rank, T, static_cast<long long>(st.rows_sent),
                static_cast<long long>(st.expert_rows), layer.num_local_experts(),
                layer.losses().aux, layer.losses().z);
  }
  Kokkos::finalize();
  MPI_Finalize();
  return 0;
}
