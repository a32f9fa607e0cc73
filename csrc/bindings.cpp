// The one binding file: exposes the native reader as cxrfast._dicom. Every native error
// becomes NativeError(kind, message) here; cxrfast/dicom.py maps it onto DicomError classes
// and adds the file name. Decoding runs with the GIL released.
#include <algorithm>
#include <cstring>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <atomic>
#include <thread>

#include "cxrdicom.h"
#include "png_unfilter.h"
#include "thread_pool.h"

namespace py = pybind11;
using namespace cxr;

namespace {

const char* kind_name(ErrorKind k) {
  switch (k) {
    case ErrorKind::Invalid: return "invalid";
    case ErrorKind::Truncated: return "truncated";
    case ErrorKind::UnsupportedTransferSyntax: return "unsupported_transfer_syntax";
    case ErrorKind::Corrupt: return "corrupt";
    case ErrorKind::NoPixelData: return "no_pixel_data";
    case ErrorKind::Unsupported: return "unsupported";
    case ErrorKind::NeedsCodec: return "needs_codec";
    case ErrorKind::Io: return "io";
  }
  return "invalid";
}

py::object native_error_type;

// numpy marks a non-native byte order with '<' or '>' ('=' or '|' otherwise).
constexpr bool kBigEndian = __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__;

// Header strings come from arbitrary files: decode them without ever failing.
py::str text(const std::string& s) {
  return py::reinterpret_steal<py::str>(PyUnicode_DecodeUTF8(s.data(), Py_ssize_t(s.size()), "replace"));
}

[[noreturn]] void raise_native(const char* kind, const std::string& message) {
  PyErr_SetObject(native_error_type.ptr(), py::make_tuple(kind, text(message)).ptr());
  throw py::error_already_set();
}

// Runs f with the GIL released, translating native errors once.
template <class F>
auto nogil(F&& f) -> decltype(f()) {
  std::string kind, message;
  {
    py::gil_scoped_release release;
    try {
      return f();
    } catch (const Error& e) {
      kind = kind_name(e.kind);
      message = e.what();
    } catch (const std::bad_alloc&) {
      kind = "invalid";
      message = "out of memory (a header announces an implausible size)";
    } catch (const std::exception& e) {  // e.g. std::length_error: still this file's problem
      kind = "invalid";
      message = std::string("internal error: ") + e.what();
    } catch (...) {
      kind = "invalid";
      message = "internal error";
    }
  }
  raise_native(kind.c_str(), message);
}

// True when the buffer's bytes are one C-contiguous block (any shape, any item size).
bool c_contiguous(const py::buffer_info& b) {
  py::ssize_t expect = b.itemsize;
  for (py::ssize_t d = b.ndim - 1; d >= 0; --d) {
    if (b.shape[size_t(d)] > 1 && b.strides[size_t(d)] != expect) return false;
    expect *= b.shape[size_t(d)];
  }
  return true;
}

// A 2-D uint8, uint16 or float32 array with contiguous rows, of the same item size as the
// images before it (itemsize 0: the first); checked with the GIL held.
py::array grey_image(py::handle item, int& itemsize) {
  if (!py::isinstance<py::array>(item)) throw py::value_error("images must be 2-D uint8, uint16 or float32 arrays");
  auto img = py::reinterpret_borrow<py::array>(item);
  if (img.ndim() != 2 ||
      !((img.dtype().kind() == 'u' && (img.itemsize() == 1 || img.itemsize() == 2)) ||
        (img.dtype().kind() == 'f' && img.itemsize() == 4)))
    throw py::value_error("images must be 2-D uint8, uint16 or float32 arrays");
  if (img.itemsize() > 1 && img.dtype().byteorder() == (kBigEndian ? '<' : '>'))
    throw py::value_error("images must be in native byte order (convert with .astype(dtype.newbyteorder('=')))");
  if (itemsize && img.itemsize() != itemsize) throw py::value_error("images must share one dtype");
  itemsize = int(img.itemsize());
  if (img.shape(0) > INT32_MAX || img.shape(1) > INT32_MAX) throw py::value_error("image too large for crop_resize");
  if (img.strides(1) != itemsize || img.strides(0) <= 0 || img.strides(0) % itemsize != 0)
    throw py::value_error("image rows must be contiguous with a positive row stride");
  return img;
}

py::object maybe_str(const std::string& s) { return s.empty() ? py::none() : py::object(text(s)); }

py::dict header_dict(const Header& h) {
  py::dict d;
  d["rows"] = h.rows;
  d["columns"] = h.columns;
  d["samples_per_pixel"] = h.samples_per_pixel;
  d["bits_allocated"] = h.bits_allocated;
  d["bits_stored"] = h.bits_stored;
  d["high_bit"] = h.high_bit;
  d["pixel_representation"] = h.pixel_representation;
  d["planar_configuration"] = h.planar_configuration;
  d["number_of_frames"] = frame_count(h);
  d["photometric"] = maybe_str(h.photometric);
  d["transfer_syntax"] = text(h.transfer_syntax);
  d["codec"] = codec_name(h.codec);
  d["rescale"] = h.has_rescale ? py::object(py::make_tuple(h.rescale_slope, h.rescale_intercept)) : py::none();
  d["rescale_type"] = maybe_str(h.rescale_type);
  if (!h.window_centers.empty() && !h.window_widths.empty())
    d["window"] = py::make_tuple(h.window_centers[0], h.window_widths[0]);
  else
    d["window"] = py::none();
  d["voi_lut_function"] = maybe_str(h.voi_function);
  d["has_voi_lut_sequence"] = h.has_voi_lut;
  d["has_modality_lut_sequence"] = h.has_modality_lut;
  d["presentation_lut_shape"] = maybe_str(h.presentation_lut_shape);
  d["modality"] = maybe_str(h.modality);
  d["view_position"] = maybe_str(h.view_position);
  d["patient_id"] = maybe_str(h.patient_id);
  d["study_instance_uid"] = maybe_str(h.study_uid);
  d["series_instance_uid"] = maybe_str(h.series_uid);
  d["sop_instance_uid"] = maybe_str(h.sop_uid);
  d["pixel_spacing"] = h.pixel_spacing.size() >= 2 ? py::object(py::make_tuple(h.pixel_spacing[0], h.pixel_spacing[1])) : py::none();
  d["has_pixel_data"] = h.has_pixel_data;
  return d;
}

RenderOptions make_options(const std::string& output, const std::string& dtype, int longest, int size_h, int size_w) {
  RenderOptions o;
  if (output == "stored") o.mode = OutputMode::Stored;
  else if (output == "modality") o.mode = OutputMode::Modality;
  else if (output == "display") o.mode = OutputMode::Display;
  else throw py::value_error("output must be 'stored', 'modality' or 'display'");
  if (dtype.empty()) o.dtype = DType::Auto;
  else if (dtype == "uint8") o.dtype = DType::U8;
  else if (dtype == "uint16") o.dtype = DType::U16;
  else if (dtype == "float32") o.dtype = DType::F32;
  else throw py::value_error("dtype must be uint8, uint16 or float32");
  o.size_longest = longest;
  o.size_h = size_h;
  o.size_w = size_w;
  return o;
}

// (frames?, rows, cols, samples?) of a rendered image.
std::vector<py::ssize_t> shape_of(const Rendered& r, bool keep_frame_axis) {
  std::vector<py::ssize_t> shape;
  if (keep_frame_axis || r.frames != 1) shape.push_back(r.frames);
  shape.push_back(r.rows);
  shape.push_back(r.columns);
  if (r.samples != 1) shape.push_back(r.samples);
  return shape;
}

// Hands the rendered buffer to numpy without a copy.
py::array to_array(Rendered&& r, bool keep_frame_axis) {
  auto* holder = new Bytes(std::move(r.data));
  py::capsule owner(holder, [](void* p) { delete static_cast<Bytes*>(p); });
  return py::array(py::dtype(r.dtype), shape_of(r, keep_frame_axis), holder->data(), owner);
}

// Hands a file's bytes to numpy as the pixels at offset `at` (see stored_in_place): the
// array owns the whole file buffer, which is the pixel data plus a header of a few KiB.
py::array file_array(FileBytes&& f, int64_t at, const Rendered& r) {
  auto* holder = new FileBytes(std::move(f));
  // Named, so tests can tell this path from a copy (numpy's array.base shows the name).
  py::capsule owner(holder, "cxrfast.file_bytes", [](void* p) { delete static_cast<FileBytes*>(p); });
  return py::array(py::dtype(r.dtype), shape_of(r, false), holder->bytes.get() + at, owner);
}

struct Parsed {
  std::unique_ptr<FileBytes> file;  // when we read the file ourselves
  std::unique_ptr<py::buffer_info> view;        // when Python gave us the bytes
  py::object owner;
  Dataset ds;
  bool handed_out = false;  // the file's bytes became a stored-values array: ds points into it
  bool masked = false;      // read_and_parse masked the pixel words

  void check_bytes() const {
    if (handed_out) throw py::value_error("the pixels of this parse were handed out; parse the file again");
  }
};

std::unique_ptr<Parsed> parse_buffer(py::buffer buf, bool header_only) {
  auto p = std::make_unique<Parsed>();
  p->view = std::make_unique<py::buffer_info>(buf.request());
  // The parser reads [ptr, ptr + size): a strided view (memoryview(b)[::-1], [::2]) would
  // make it read other bytes, or bytes outside the buffer.
  if (!c_contiguous(*p->view))
    throw py::value_error("the buffer is not C-contiguous (a strided view?): pass bytes(buffer)");
  p->owner = buf;
  auto* data = static_cast<const uint8_t*>(p->view->ptr);
  size_t size = size_t(p->view->size * p->view->itemsize);
  p->ds = nogil([&] { return Dataset::parse(data, size, header_only); });
  return p;
}

std::unique_ptr<Parsed> parse_path(const std::string& path, bool header_only) {
  auto p = std::make_unique<Parsed>();
  p->ds = nogil([&] {
    if (header_only) {
      // Headers nearly always end within the first 64 KiB: read only that, unless the
      // parse runs out of bytes before Pixel Data (then read the whole file, below).
      p->file = std::make_unique<FileBytes>(read_file(path, size_t(1) << 16));
      if (p->file->whole) return Dataset::parse(p->file->data(), p->file->size(), true);
      try {
        Dataset ds = Dataset::parse(p->file->data(), p->file->size(), true);
        if (ds.header.has_pixel_data) return ds;
      } catch (const Error&) {
      }
    }
    if (header_only) {
      p->file = std::make_unique<FileBytes>(read_file(path));
      return Dataset::parse(p->file->data(), p->file->size(), true);
    }
    Dataset ds;
    p->file = std::make_unique<FileBytes>(read_and_parse(path, ds, p->masked));
    return ds;
  });
  return p;
}

struct ManyResult {
  bool ok = false;
  Rendered image;
  FileBytes file;    // with in_file >= 0: the pixels lie in the file's bytes at that offset
  int64_t in_file = -1;
  Header header;
  std::string kind, message;
};

}  // namespace

PYBIND11_MODULE(_dicom, m) {
  m.doc() = "cxrfast native DICOM reader (C++17); use cxrfast.dicom, not this module.";
  native_error_type = py::reinterpret_borrow<py::object>(
      PyErr_NewException("cxrfast._dicom.NativeError", PyExc_Exception, nullptr));
  m.attr("NativeError") = native_error_type;

  py::class_<Parsed>(m, "Parsed")
      .def_property_readonly("header", [](const Parsed& p) { return header_dict(p.ds.header); })
      .def("decode",
           [](Parsed& p, const std::string& output, int64_t frame, const std::string& dtype, int longest,
              int size_h, int size_w, int threads) {
             // Stored values of a file read here are masked in its own buffer, which becomes the
             // array: one read, no second buffer (then this parse's bytes are gone).
             p.check_bytes();
             RenderOptions o = make_options(output, dtype, longest, size_h, size_w);
             o.threads = std::max(1, threads);
             if (p.file && p.file->whole) {
               Rendered shape;
               int64_t at = nogil([&] { return stored_in_place(p.ds, p.file->bytes.get(), frame, o, shape, p.masked); });
               if (at >= 0) {
                 p.handed_out = true;
                 return file_array(std::move(*p.file), at, shape);
               }
             }
             Rendered r = nogil([&] { return decode_render(p.ds, frame, o); });
             return to_array(std::move(r), false);
           },
           py::arg("output"), py::arg("frame"), py::arg("dtype"), py::arg("longest"), py::arg("size_h"), py::arg("size_w"),
           py::arg("threads") = 1)
      .def("render",
           [](const Parsed& p, py::array stored, const std::string& output, const std::string& dtype, int longest,
              int size_h, int size_w) {
             // Stored values decoded by a Python codec library: (frames, rows, cols[, samples]).
             RenderOptions o = make_options(output, dtype, longest, size_h, size_w);
             py::array c = py::array::ensure(stored, py::array::c_style);
             if (c.ndim() < 3 || c.ndim() > 4) throw py::value_error("stored must be (frames, rows, cols[, samples])");
             int isz = int(c.itemsize());
             if (isz != 1 && isz != 2 && isz != 4) throw py::value_error("stored must be 8, 16 or 32-bit integers");
             StoredPixels px;
             px.frames = int(c.shape(0));
             px.rows = int(c.shape(1));
             px.columns = int(c.shape(2));
             px.samples = c.ndim() == 4 ? int(c.shape(3)) : 1;
             px.bytes_per_sample = isz;
             const uint8_t* src = static_cast<const uint8_t*>(c.data());
             px.data.resize(size_t(c.nbytes()));
             std::memcpy(px.data.data(), src, size_t(c.nbytes()));
             Header h = p.ds.header;
             h.samples_per_pixel = px.samples;
             if (isz * 8 < h.bits_allocated || h.bits_allocated == 0) h.bits_allocated = isz * 8;
             if (h.bits_stored > isz * 8 || h.bits_stored == 0) h.bits_stored = isz * 8;
             if (h.high_bit >= isz * 8) h.high_bit = h.bits_stored - 1;
             Rendered r = nogil([&] { return render(h, px, o); });
             return to_array(std::move(r), true);
           })
      .def("display_lut",
           [](const Parsed& p, py::object value_range) {
             bool has = !value_range.is_none();
             int64_t lo = 0, hi = 0;
             if (has) {
               auto t = value_range.cast<std::pair<int64_t, int64_t>>();
               lo = t.first;
               hi = t.second;
             }
             DisplayLut lut = nogil([&] {
               if (p.ds.header.float_bits) throw Error(ErrorKind::Unsupported, "display LUT for Float Pixel Data");
               return display_lut(p.ds.header, has, lo, hi);
             });
             py::array_t<float> values(py::ssize_t(lut.values.size()));
             std::copy(lut.values.begin(), lut.values.end(), values.mutable_data());
             return py::make_tuple(values, lut.shift, lut.mask, lut.needs_range);
           },
           py::arg("value_range") = py::none())
      .def("needs_range",
           [](const Parsed& p) {
             // True when the display LUT depends on the image's own stored value range.
             try {
               return display_lut(p.ds.header, true, 0, 0).needs_range;
             } catch (const Error&) {
               return false;
             }
           })
      .def("frame_spans",
           [](const Parsed& p) {
             // (offset, length) into the caller's bytes for single-fragment frames; bytes when the
             // frame was joined from fragments or the buffer is ours (a file we read, inflated data).
             p.check_bytes();
             auto frames = nogil([&] { return encapsulated_frames(p.ds); });
             py::list out;
             const uint8_t* base = p.ds.bytes();
             bool ours = p.file || !p.view || base != static_cast<const uint8_t*>(p.view->ptr);
             for (auto& f : frames) {
               if (f.owned || ours)
                 out.append(py::bytes(reinterpret_cast<const char*>(f.data), f.size));
               else
                 out.append(py::make_tuple(size_t(f.data - base), f.size));
             }
             return out;
           });

  m.def("parse", &parse_buffer, py::arg("buffer"), py::arg("header_only") = false);
  m.def("parse_file", &parse_path, py::arg("path"), py::arg("header_only") = false);

  m.def(
      "read_many",
      [](std::vector<std::string> paths, int num_threads, const std::string& output, int64_t frame,
         const std::string& dtype, int longest, int size_h, int size_w) {
        RenderOptions o = make_options(output, dtype, longest, size_h, size_w);
        std::vector<ManyResult> results(paths.size());
        std::exception_ptr failed_start;
        size_t started = 0;
        const int n = std::max(1, std::min<int>(num_threads, int(paths.size())));
        {
          py::gil_scoped_release release;
          std::atomic<size_t> next{0};
          auto work = [&] {
            for (size_t i = next++; i < paths.size(); i = next++) {
              ManyResult& r = results[i];
              try {
                try {
                  Dataset ds;
                  bool masked = false;
                  r.file = read_and_parse(paths[i], ds, masked);
                  r.header = ds.header;
                  r.in_file = stored_in_place(ds, r.file.bytes.get(), frame, o, r.image, masked);
                  if (r.in_file < 0) {
                    r.image = decode_render(ds, frame, o);
                    r.file = FileBytes();
                  }
                  r.ok = true;
                } catch (const Error& e) {
                  r.kind = kind_name(e.kind);
                  r.message = e.what();
                } catch (const std::bad_alloc&) {
                  r.kind = "invalid";
                  r.message = "out of memory (a header announces an implausible size)";
                } catch (const std::exception& e) {  // nothing may escape a worker thread
                  r.kind = "invalid";
                  r.message = std::string("internal error: ") + e.what();
                } catch (...) {
                  r.kind = "invalid";
                  r.message = "internal error";
                }
              } catch (...) {  // a handler above could not allocate its message
                r.ok = false;
                r.kind = "invalid";
                r.message = "out of memory";  // both short enough to need no allocation
              }
            }
          };
          std::vector<std::thread> pool;
          failed_start = start_threads(pool, n - 1, work);  // no memory or threads left
          if (failed_start)
            next = paths.size();  // the started workers stop after their current file
          else
            work();
          for (auto& t : pool) t.join();
          started = pool.size() + 1;
        }
        if (failed_start)
          throw std::runtime_error("cannot start " + std::to_string(n) + " native threads (" +
                                   std::to_string(started) + " started): " + exception_text(failed_start));
        py::list out;
        for (auto& r : results) {
          if (r.ok && r.in_file >= 0)
            out.append(py::make_tuple(file_array(std::move(r.file), r.in_file, r.image), header_dict(r.header), py::none()));
          else if (r.ok)
            out.append(py::make_tuple(to_array(std::move(r.image), false), header_dict(r.header), py::none()));
          else
            out.append(py::make_tuple(py::none(), py::none(), py::make_tuple(r.kind, text(r.message))));
        }
        return out;
      },
      py::arg("paths"), py::arg("num_threads"), py::arg("output"), py::arg("frame"), py::arg("dtype"),
      py::arg("longest"), py::arg("size_h"), py::arg("size_w"));

  m.def(
      "crop_resize",
      [](py::list images, py::array_t<int64_t, py::array::c_style | py::array::forcecast> boxes,
         py::array_t<bool, py::array::c_style | py::array::forcecast> mirror, py::array out, float gain, float offset,
         int num_threads) {
        // Validated here, with the GIL held: the native loop trusts every pointer and box.
        const size_t n = images.size();
        if (boxes.ndim() != 2 || size_t(boxes.shape(0)) != n || boxes.shape(1) != 4)
          throw py::value_error("boxes must be (len(images), 4): top, left, height, width");
        if (mirror.ndim() != 1 || size_t(mirror.shape(0)) != n) throw py::value_error("mirror must be (len(images),)");
        if (!py::isinstance<py::array_t<float>>(out) || out.ndim() != 3 || size_t(out.shape(0)) != n ||
            out.shape(1) != out.shape(2) || !(out.flags() & py::array::c_style) || !out.writeable())
          throw py::value_error("out must be a writable C-contiguous float32 array (len(images), size, size)");
        if (out.shape(1) < 1 || out.shape(1) > 65536) throw py::value_error("out size must be 1 to 65536");
        const int size = int(out.shape(1));
        int itemsize = 0;
        std::vector<CropJob> jobs(n);
        // Owned references to every image, taken with the GIL held: once it is released the
        // caller may change `images` (or drop its last reference to an array), and the native
        // loop reads only arrays kept alive here. Declared before the GIL release below, so
        // they are released after the GIL is taken back.
        std::vector<py::array> keep;
        keep.reserve(n);
        auto box = boxes.unchecked<2>();
        auto flip = mirror.unchecked<1>();
        auto* dst = static_cast<float*>(out.mutable_data());
        for (size_t i = 0; i < n; ++i) {
          keep.push_back(grey_image(images[i], itemsize));
          const py::array& img = keep.back();
          CropJob& j = jobs[i];
          j.top = int(box(i, 0)), j.left = int(box(i, 1)), j.height = int(box(i, 2)), j.width = int(box(i, 3));
          if (box(i, 0) < 0 || box(i, 1) < 0 || box(i, 2) < 1 || box(i, 3) < 1 || box(i, 0) + box(i, 2) > img.shape(0) ||
              box(i, 1) + box(i, 3) > img.shape(1))
            throw py::value_error("crop box " + std::to_string(i) + " lies outside its image");
          j.src = img.data();
          j.stride = img.strides(0) / itemsize;
          j.mirror = flip(i);
          j.out = dst + i * size_t(size) * size;
        }
        if (n == 0) return;
        py::gil_scoped_release release;
        crop_resize_many(jobs, itemsize, size, gain, offset, num_threads);
      },
      py::arg("images"), py::arg("boxes"), py::arg("mirror"), py::arg("out"), py::arg("gain"), py::arg("offset"),
      py::arg("num_threads") = 1);

  m.def(
      "resize",
      [](py::list images, py::array_t<int64_t, py::array::c_style | py::array::forcecast> shapes, float gain,
         float offset, int num_threads) {
        // Whole images resized to their own (rows, columns): new float32 arrays.
        const size_t n = images.size();
        if (shapes.ndim() != 2 || size_t(shapes.shape(0)) != n || shapes.shape(1) != 2)
          throw py::value_error("shapes must be (len(images), 2): rows, columns");
        auto shape = shapes.unchecked<2>();
        int itemsize = 0;
        std::vector<py::array> keep;  // owned references, as in crop_resize
        std::vector<py::array_t<float>> outs;
        keep.reserve(n);
        outs.reserve(n);
        std::vector<CropJob> jobs(n);
        for (size_t i = 0; i < n; ++i) {
          keep.push_back(grey_image(images[i], itemsize));
          const py::array& img = keep.back();
          if (shape(i, 0) < 1 || shape(i, 1) < 1 || shape(i, 0) > 65536 || shape(i, 1) > 65536)
            throw py::value_error("output shape " + std::to_string(i) + " must be 1 to 65536 per side");
          outs.emplace_back(std::vector<py::ssize_t>{py::ssize_t(shape(i, 0)), py::ssize_t(shape(i, 1))});
          CropJob& j = jobs[i];
          j.height = int(img.shape(0)), j.width = int(img.shape(1));
          if (j.height < 1 || j.width < 1) throw py::value_error("image " + std::to_string(i) + " is empty");
          j.src = img.data();
          j.stride = img.strides(0) / itemsize;
          j.out_h = int(shape(i, 0)), j.out_w = int(shape(i, 1));
          j.out = outs.back().mutable_data();
        }
        if (n) {
          py::gil_scoped_release release;
          crop_resize_many(jobs, itemsize, 0, gain, offset, num_threads);
        }
        py::list result;
        for (auto& o : outs) result.append(o);
        return result;
      },
      py::arg("images"), py::arg("shapes"), py::arg("gain") = 1.0f, py::arg("offset") = 0.0f,
      py::arg("num_threads") = 1);

  m.def(
      "png_unfilter",
      [](py::buffer raw, int64_t rows, int64_t columns, int depth) {
        // Inflated IDAT data of a non-interlaced 8/16-bit greyscale PNG -> (rows, columns)
        // uint8 or native-order uint16 samples.
        if (depth != 8 && depth != 16) throw py::value_error("depth must be 8 or 16");
        if (rows < 1 || columns < 1 || rows > INT32_MAX || columns > INT32_MAX)
          throw py::value_error("rows and columns must be 1 to 2**31 - 1");
        py::buffer_info in = raw.request();
        if (in.itemsize != 1 || !c_contiguous(in)) throw py::value_error("raw must be contiguous bytes");
        const size_t bpp = size_t(depth / 8), row_bytes = size_t(columns) * bpp;
        py::array out = depth == 8 ? py::array(py::array_t<uint8_t>({rows, columns}))
                                   : py::array(py::array_t<uint16_t>({rows, columns}));
        auto* src = static_cast<const uint8_t*>(in.ptr);
        auto* dst = static_cast<uint8_t*>(out.mutable_data());
        const size_t size = size_t(in.size);
        nogil([&] {
          png_unfilter(src, size, dst, uint32_t(rows), row_bytes, int(bpp));
          if (bpp == 2 && !kBigEndian) swap_bytes16(dst, size_t(rows) * size_t(columns));
        });
        return out;
      },
      py::arg("raw"), py::arg("rows"), py::arg("columns"), py::arg("depth"));

  m.def(
      "jpeg_lossless_decode",
      [](py::bytes stream, int threads, int64_t split_bit, bool with_split) -> py::object {
        // Decodes a bare SOF3 codestream (for tests and benchmarks against other codecs).
        // threads=2: a second thread on one large image; split_bit: where the speculative
        // second decoder starts (tests only; it also lifts the size threshold); with_split:
        // return (image, JpegLosslessInfo::split) to show which path ran.
        std::string_view sv = stream;
        auto* data = reinterpret_cast<const uint8_t*>(sv.data());
        JpegLosslessInfo info = nogil([&] { return jpeg_lossless_info(data, sv.size()); });
        py::array_t<uint16_t> out({info.height, info.width});
        uint16_t* dst = out.mutable_data();
        size_t cap = size_t(info.height) * info.width;
        info = nogil([&] { return jpeg_lossless_decode(data, sv.size(), dst, cap, threads, split_bit); });
        if (with_split) return py::make_tuple(out, info.split);
        return std::move(out);
      },
      py::arg("stream"), py::arg("threads") = 1, py::arg("split_bit") = -1,
      py::arg("with_split") = false);
}
