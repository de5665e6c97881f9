# Test registration, in the style of Cabana's Cabana_add_tests:
#
#   examoe_add_tests([RANKS 1 2 ...] NAMES a b ... [LABELS ...])
#     builds one GoogleTest executable per unit, examoe_test_<name>, from tests/test_<name>.cpp
#     and the shared MPI-aware main, and registers it at each rank count as ctest <name>.np<N>.
#     Without RANKS a test runs at every count of ExaMoE_TEST_RANKS (1 2 3 4; the sanitizer
#     preset sets 2). The ctest names follow the files: tests/test_layer.cpp is layer.np1..np4.
#
#   examoe_add_mpi_test(NAME <name> TARGET <exe> [RANKS ...] [ARGS ...] [LABELS ...])
#     registers any MPI executable the same way (<name>.np<N>, labelled "mpi" and "np<N>",
#     plus LABELS: the "scale" tests run a unit's rank-count tests at 8 and 16 ranks).
include_guard(GLOBAL)

set(ExaMoE_TEST_RANKS "1;2;3;4" CACHE STRING "Rank counts every MPI test runs at")
# A hang (a rank left in a collective) fails at this limit. 4 ranks on 2 cores busy-poll
# (MPICH ch4), so the training tests need minutes there.
set(ExaMoE_TEST_TIMEOUT 900 CACHE STRING "Seconds an MPI test may run before it counts as hung")

function(examoe_add_mpi_test)
  cmake_parse_arguments(T "" "NAME;TARGET" "RANKS;ARGS;LABELS" ${ARGN})
  if(NOT T_RANKS)
    set(T_RANKS ${ExaMoE_TEST_RANKS})
  endif()
  foreach(np IN LISTS T_RANKS)
    set(labels mpi np${np} ${T_LABELS})
    add_test(NAME ${T_NAME}.np${np}
             COMMAND ${MPIEXEC_EXECUTABLE} ${MPIEXEC_NUMPROC_FLAG} ${np} ${MPIEXEC_PREFLAGS}
                     $<TARGET_FILE:${T_TARGET}> ${MPIEXEC_POSTFLAGS} ${T_ARGS})
    set_tests_properties(${T_NAME}.np${np} PROPERTIES
      LABELS "${labels}" PROCESSORS ${np} TIMEOUT ${ExaMoE_TEST_TIMEOUT}
      ENVIRONMENT "OPENBLAS_NUM_THREADS=1;OMP_NUM_THREADS=1")
  endforeach()
endfunction()

function(examoe_add_tests)
  cmake_parse_arguments(T "" "" "RANKS;NAMES;LABELS" ${ARGN})
  foreach(name IN LISTS T_NAMES)
    add_executable(examoe_test_${name} test_${name}.cpp)
    target_link_libraries(examoe_test_${name} PRIVATE examoe_test_main)
    examoe_add_mpi_test(NAME ${name} TARGET examoe_test_${name} RANKS ${T_RANKS} LABELS ${T_LABELS})
  endforeach()
endfunction()
