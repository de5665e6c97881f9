# slurm.local: a real single-node Slurm cluster (munged, slurmctld, slurmd) started from a temp
# dir, then `srun -n 2 --mpi=pmi2 examoe train`, `sbatch --wait examples/slurm/train-cpu.sbatch`
# and SIGUSR1 forwarding by that script. Skipped (exit 77) without Slurm and munge installed
# (Debian: slurmctld slurmd slurm-client munge) or without root. It stops only the daemons it
# started. Run it alone: ctest -L slurm --output-on-failure
add_test(NAME slurm.local
         COMMAND bash ${CMAKE_CURRENT_LIST_DIR}/slurm/run-local-slurm.sh
                 $<TARGET_FILE:examoe_app> ${PROJECT_SOURCE_DIR})
set_tests_properties(slurm.local PROPERTIES
                     SKIP_RETURN_CODE 77
                     TIMEOUT 600
                     LABELS slurm
                     RUN_SERIAL TRUE)
