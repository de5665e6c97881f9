# examoe_add_mpi_test(NAME <name> TARGET <exe> [RANKS 1 2 3 4] [ARGS ...])
# Registers one ctest entry per rank count: <name>.np<N>, labelled "mpi".
include_guard(GLOBAL)

set(ExaMoE_TEST_RANKS "1;2;3;4" CACHE STRING "Rank counts every MPI test runs at")

function(examoe_add_mpi_test)
  cmake_parse_arguments(T "" "NAME;TARGET" "RANKS;ARGS" ${ARGN})
  if(NOT T_RANKS)
    set(T_RANKS ${ExaMoE_TEST_RANKS})
  endif()
  foreach(np IN LISTS T_RANKS)
    add_test(NAME ${T_NAME}.np${np}
             COMMAND ${MPIEXEC_EXECUTABLE} ${MPIEXEC_NUMPROC_FLAG} ${np} ${MPIEXEC_PREFLAGS}
                     $<TARGET_FILE:${T_TARGET}> ${MPIEXEC_POSTFLAGS} ${T_ARGS})
    set_tests_properties(${T_NAME}.np${np} PROPERTIES
      LABELS "mpi;np${np}" PROCESSORS ${np} TIMEOUT 600
      ENVIRONMENT "OPENBLAS_NUM_THREADS=1;OMP_NUM_THREADS=1")
  endforeach()
endfunction()
