# unimsg_add_module(NAME SOURCES ... [PUBLIC ...] [PRIVATE ...])
# One folder, one target: unimsg_<NAME> (alias unimsg::<NAME>) from the folder's src/, with the
# folder's include/ as its only include directory. Headers live under include/unimsg/<NAME>/, so
# a target sees another module's headers only by linking it: an include from a lower layer to an
# upper one fails to compile (scripts/check-layers checks the same edges against the layer map).
function(unimsg_add_module name)
  cmake_parse_arguments(ARG "" "" "SOURCES;PUBLIC;PRIVATE" ${ARGN})
  add_library(unimsg_${name} ${ARG_SOURCES})
  add_library(unimsg::${name} ALIAS unimsg_${name})
  target_include_directories(unimsg_${name} PUBLIC ${CMAKE_CURRENT_SOURCE_DIR}/include
                                            PRIVATE ${CMAKE_CURRENT_SOURCE_DIR}/src)
  target_link_libraries(unimsg_${name} PUBLIC ${ARG_PUBLIC} PRIVATE ${ARG_PRIVATE})
endfunction()
