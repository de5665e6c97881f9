# Installed tree: find_package consumer, pkg-config (Makefile) consumer, relocation.
# The host MPI code runs in-tree at 2 and 4 ranks.
if(TARGET host_mpi_code)
  foreach(np 2 4)
    add_test(NAME host_mpi_code.np${np}
             COMMAND ${MPIEXEC_EXECUTABLE} ${MPIEXEC_NUMPROC_FLAG} ${np} $<TARGET_FILE:host_mpi_code>)
    set_tests_properties(host_mpi_code.np${np} PROPERTIES LABELS "mpi;examples" PROCESSORS ${np}
      TIMEOUT 300 ENVIRONMENT "OPENBLAS_NUM_THREADS=1")
  endforeach()
endif()
add_test(NAME install.consumers
         COMMAND bash ${CMAKE_CURRENT_LIST_DIR}/install/run.sh ${PROJECT_BINARY_DIR} ${PROJECT_SOURCE_DIR}
                 ${MPIEXEC_EXECUTABLE})
set_tests_properties(install.consumers PROPERTIES LABELS "install" TIMEOUT 900 RUN_SERIAL TRUE
  ENVIRONMENT "OPENBLAS_NUM_THREADS=1")
