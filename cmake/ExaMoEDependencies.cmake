# Finds every dependency of ExaMoE. Used by the build and (through ExaMoEConfig.cmake) by
# projects that consume an installed ExaMoE.
include_guard(GLOBAL)
include(${CMAKE_CURRENT_LIST_DIR}/ExaMoEKokkosRepair.cmake)

find_package(MPI REQUIRED COMPONENTS CXX)
find_package(Kokkos REQUIRED)
examoe_repair_kokkos()
find_package(KokkosKernels REQUIRED)
examoe_repair_kokkoskernels()
