# Install rules: headers, library, the examoe command, a relocatable CMake package and a
# pkg-config file for Makefile-based codes.
include_guard(GLOBAL)
include(GNUInstallDirs)
include(CMakePackageConfigHelpers)

set(ExaMoE_INSTALL_CMAKEDIR ${CMAKE_INSTALL_LIBDIR}/cmake/ExaMoE CACHE STRING
    "Where the ExaMoE CMake package is installed")

install(DIRECTORY ${PROJECT_SOURCE_DIR}/include/examoe DESTINATION ${CMAKE_INSTALL_INCLUDEDIR}
        FILES_MATCHING PATTERN "*.hpp")
install(FILES ${PROJECT_BINARY_DIR}/include/examoe/config.hpp
        DESTINATION ${CMAKE_INSTALL_INCLUDEDIR}/examoe)
install(TARGETS examoe EXPORT ExaMoETargets
        ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR}
        LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR}
        RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR}
        INCLUDES DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
if(TARGET examoe_app)
  install(TARGETS examoe_app RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR})
endif()
install(EXPORT ExaMoETargets NAMESPACE ExaMoE:: DESTINATION ${ExaMoE_INSTALL_CMAKEDIR})
configure_package_config_file(${PROJECT_SOURCE_DIR}/cmake/ExaMoEConfig.cmake.in
  ${PROJECT_BINARY_DIR}/ExaMoEConfig.cmake INSTALL_DESTINATION ${ExaMoE_INSTALL_CMAKEDIR})
write_basic_package_version_file(${PROJECT_BINARY_DIR}/ExaMoEConfigVersion.cmake
  VERSION ${PROJECT_VERSION} COMPATIBILITY SameMinorVersion)
install(FILES ${PROJECT_BINARY_DIR}/ExaMoEConfig.cmake ${PROJECT_BINARY_DIR}/ExaMoEConfigVersion.cmake
              ${PROJECT_SOURCE_DIR}/cmake/ExaMoEKokkosRepair.cmake
              ${PROJECT_SOURCE_DIR}/cmake/FindNCCL.cmake
        DESTINATION ${ExaMoE_INSTALL_CMAKEDIR})

# ---- pkg-config: flags of ExaMoE and of everything it links, resolved from the targets.
function(_examoe_pc_collect item)
  if(item MATCHES "^\\$<" OR item MATCHES "^-D")
    return()
  endif()
  if(TARGET ${item})
    get_property(seen GLOBAL PROPERTY _EXAMOE_PC_SEEN)
    if(item IN_LIST seen)
      return()
    endif()
    set_property(GLOBAL APPEND PROPERTY _EXAMOE_PC_SEEN ${item})
    get_target_property(alias ${item} ALIASED_TARGET)
    if(alias)
      _examoe_pc_collect(${alias})
      return()
    endif()
    get_target_property(inc ${item} INTERFACE_INCLUDE_DIRECTORIES)
    foreach(d IN LISTS inc)
      if(d AND NOT d MATCHES "^\\$<")
        set_property(GLOBAL APPEND PROPERTY _EXAMOE_PC_CFLAGS "-I${d}")
      endif()
    endforeach()
    get_target_property(type ${item} TYPE)
    get_target_property(imported ${item} IMPORTED)
    if(imported AND NOT type STREQUAL "INTERFACE_LIBRARY")
      set(loc "")
      get_target_property(loc ${item} IMPORTED_LOCATION)
      if(NOT loc)
        get_target_property(cfgs ${item} IMPORTED_CONFIGURATIONS)
        foreach(c IN LISTS cfgs)
          if(NOT loc)
            get_target_property(loc ${item} IMPORTED_LOCATION_${c})
          endif()
        endforeach()
      endif()
      if(loc)
        set_property(GLOBAL APPEND PROPERTY _EXAMOE_PC_LIBS "${loc}")
      endif()
    endif()
    get_target_property(libs ${item} INTERFACE_LINK_LIBRARIES)
    foreach(l IN LISTS libs)
      if(l)
        _examoe_pc_collect(${l})
      endif()
    endforeach()
  elseif(IS_ABSOLUTE "${item}" OR item MATCHES "^-l")
    set_property(GLOBAL APPEND PROPERTY _EXAMOE_PC_LIBS "${item}")
  elseif(item)
    set_property(GLOBAL APPEND PROPERTY _EXAMOE_PC_LIBS "-l${item}")
  endif()
endfunction()

set_property(GLOBAL PROPERTY _EXAMOE_PC_SEEN "")
set(_pc_targets Kokkos::kokkoskernels Kokkos::kokkos)
if(ExaMoE_USE_NCCL)
  list(APPEND _pc_targets NCCL::NCCL CUDA::cudart)
endif()
foreach(t IN LISTS _pc_targets)
  _examoe_pc_collect(${t})
endforeach()
get_property(_pc_cflags GLOBAL PROPERTY _EXAMOE_PC_CFLAGS)
get_property(_pc_libs GLOBAL PROPERTY _EXAMOE_PC_LIBS)
list(REMOVE_DUPLICATES _pc_cflags)
list(REMOVE_DUPLICATES _pc_libs)
string(REPLACE ";" " " EXAMOE_PC_CFLAGS "${_pc_cflags}")
string(REPLACE ";" " " EXAMOE_PC_LIBS "${_pc_libs}")
configure_file(${PROJECT_SOURCE_DIR}/cmake/examoe.pc.in ${PROJECT_BINARY_DIR}/examoe.pc @ONLY)
install(FILES ${PROJECT_BINARY_DIR}/examoe.pc DESTINATION ${CMAKE_INSTALL_LIBDIR}/pkgconfig)
