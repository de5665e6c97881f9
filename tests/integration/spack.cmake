# The Spack recipe (spack/): checked without Spack by a stand-alone Python script that loads
# package.py against stand-ins of Spack's package API and cross-checks it with CMakeLists.txt.
find_program(EXAMOE_PYTHON3 NAMES python3)
if(EXAMOE_PYTHON3)
  add_test(NAME spack.recipe
           COMMAND ${EXAMOE_PYTHON3} ${CMAKE_CURRENT_LIST_DIR}/spack/check_recipe.py
                   ${PROJECT_SOURCE_DIR})
  set_tests_properties(spack.recipe PROPERTIES LABELS spack TIMEOUT 60)
else()
  message(STATUS "ExaMoE: python3 not found; test spack.recipe not registered")
endif()
