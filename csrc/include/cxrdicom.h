// cxrdicom: the public interface of cxrfast's native DICOM reader.
//
// The core has no Python in it: it parses DICOM Part 10 (PS3.10) from a caller-owned
// buffer, decodes pixel data (native, RLE, JPEG lossless process 14) and renders stored
// values through the display pipeline of PS3.3 C.11 into caller-visible buffers.
// Every failure is a cxr::Error with a kind; nothing reads outside its buffers.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "buffer.h"

namespace cxr {

enum class ErrorKind {
  Invalid,                    // not DICOM, or a malformed data set
  Truncated,                  // the data ends before something it announces
  UnsupportedTransferSyntax,  // a transfer syntax we do not know at all
  Corrupt,                    // a compressed codestream that cannot be decoded
  NoPixelData,                // the data set has no (7FE0,0010)
  Unsupported,                // a legal feature this reader does not handle
  NeedsCodec,                 // compressed with a codec left to a Python library
  Io,                         // the file could not be read
};

struct Error : std::runtime_error {
  ErrorKind kind;
  Error(ErrorKind k, const std::string& message) : std::runtime_error(message), kind(k) {}
};

// A lookup table from a LUT Sequence item (PS3.3 C.11.1, C.11.2): LUT Descriptor + LUT Data.
struct Lut {
  int64_t first_mapped = 0;
  int bits = 16;
  std::vector<uint16_t> data;
};

struct Span {
  size_t offset = 0;
  size_t length = 0;
};

enum class Codec { Native, Rle, JpegLossless, JpegBaseline, JpegExtended, JpegLs, Jpeg2000, Htj2k };

const char* codec_name(Codec codec);

// The attributes a CXR reader needs, from the top-level data set only.
struct Header {
  std::string transfer_syntax;
  bool explicit_vr = true;
  bool big_endian = false;
  bool deflated = false;
  bool has_file_meta = false;
  bool unknown_syntax = false;
  Codec codec = Codec::Native;

  int rows = 0, columns = 0, samples_per_pixel = 1;
  int bits_allocated = 0, bits_stored = 0, high_bit = -1, pixel_representation = 0;
  int planar_configuration = 0;
  int64_t number_of_frames = 1;
  std::string photometric, modality, view_position, patient_id;
  std::string study_uid, series_uid, sop_uid;
  std::string voi_function, presentation_lut_shape, rescale_type;

  bool has_rescale = false;
  double rescale_slope = 1.0, rescale_intercept = 0.0;
  std::vector<double> window_centers, window_widths;
  bool has_modality_lut = false;
  Lut modality_lut;
  bool has_voi_lut = false;
  Lut voi_lut;
  std::vector<double> pixel_spacing;

  bool has_pixel_data = false;
  int float_bits = 0;                     // 32 / 64: Float / Double Float Pixel Data (7FE0,0008 / 0009)
  bool encapsulated = false;
  bool pixel_vr_ow = false;               // OW pixel data: 16-bit words even when 8-bit
  Span pixel_data;                        // native pixel data, in the data set buffer
  Span pixel_declared;                    // the Pixel Data value's offset and declared length
                                          // (0xFFFFFFFF: undefined), set by header-only parses too
  std::vector<Span> fragments;            // encapsulated fragments (after the BOT item)
  std::vector<size_t> fragment_positions; // item-tag offsets relative to the first fragment
  std::vector<uint32_t> basic_offsets;
  std::vector<uint64_t> extended_offsets, extended_lengths;
};

// A parsed file: the header plus the bytes its spans point into.
class Dataset {
 public:
  // Parses data[0, size). The caller keeps the bytes alive while the Dataset lives
  // (a deflated data set is inflated into memory the Dataset owns).
  static Dataset parse(const uint8_t* data, size_t size, bool header_only);

  Header header;
  const uint8_t* bytes() const { return inflated_.empty() ? data_ : inflated_.data(); }
  size_t byte_size() const { return inflated_.empty() ? size_ : inflated_.size(); }

 private:
  const uint8_t* data_ = nullptr;
  size_t size_ = 0;
  std::vector<uint8_t> inflated_;
  friend class Parser;
};

// One compressed frame: a view into the data set when it is one fragment, else a copy.
struct FrameBytes {
  const uint8_t* data = nullptr;
  size_t size = 0;
  std::shared_ptr<std::vector<uint8_t>> owned;
};

std::vector<FrameBytes> encapsulated_frames(const Dataset& ds);
int64_t frame_count(const Header& h);

// A buffer that is not zero-filled when allocated (every writer fills every byte, and an
// extra pass over a multi-megabyte image is measurable), huge-page backed when large.
class Bytes {
 public:
  void resize(size_t n) {
    p_ = allocate_buffer(n);
    n_ = n;
  }
  uint8_t* data() { return p_.get(); }
  const uint8_t* data() const { return p_.get(); }
  size_t size() const { return n_; }
  uint8_t& operator[](size_t i) { return p_[i]; }

 private:
  Buffer p_;
  size_t n_ = 0;
};

// Stored samples of one or more frames, interleaved (frame, row, column, sample), each
// sample in an unsigned word of bytes_per_sample (1, 2 or 4) bytes, unmasked.
struct StoredPixels {
  int frames = 0, rows = 0, columns = 0, samples = 1;
  int bytes_per_sample = 2;
  Bytes data;
  const uint8_t* view = nullptr;  // when set, the samples are read in place from here
  const uint8_t* bytes() const { return view ? view : data.data(); }
  size_t count() const { return size_t(frames) * rows * columns * samples; }
};

// Decodes frame `frame` (or all frames when frame < 0) natively; throws NeedsCodec for
// transfer syntaxes left to Python codec libraries.
StoredPixels decode_stored(const Dataset& ds, int64_t frame, int threads = 1);

// Decoders (each validates its input and throws Error on anything malformed).
void rle_decode_frame(const uint8_t* src, size_t size, const Header& h, uint8_t* out);
struct JpegLosslessInfo {
  int width = 0, height = 0, components = 0, precision = 0, predictor = 0, point_transform = 0;
  int restart_interval = 0;
  // How the decode used a second thread: 0 not at all, 1 restart intervals split between
  // two threads, 2 speculative split that met, 3 speculative split that did not (serial).
  int split = 0;
};
// Decodes a single-component SOF3 stream into out[height*width] (uint16, value << Pt).
// threads >= 2 lets one large image use a second thread: restart intervals of whole rows
// are split between them, a scan without restart markers is split speculatively at its
// middle (or at split_bit >= 0, which also lifts the size threshold: for tests). The output
// and errors are those of the one-thread decode.
JpegLosslessInfo jpeg_lossless_decode(const uint8_t* src, size_t size, uint16_t* out,
                                      size_t out_capacity, int threads = 1, int64_t split_bit = -1);
JpegLosslessInfo jpeg_lossless_info(const uint8_t* src, size_t size);

enum class OutputMode { Stored, Modality, Display };
enum class DType { Auto, U8, U16, F32 };

struct RenderOptions {
  OutputMode mode = OutputMode::Display;
  DType dtype = DType::Auto;
  int size_longest = 0;       // resize so the longer side is this, aspect preserved
  int size_h = 0, size_w = 0; // or an exact output size
  int threads = 1;            // native threads for one frame's decode (JPEG lossless: the two-thread split)
};

// numpy-style dtype codes: 'u1','i1','u2','i2','u4','i4','f4'.

struct Rendered {
  std::string dtype;
  int frames = 0, rows = 0, columns = 0, samples = 1;
  Bytes data;
};

Rendered render(const Header& h, const StoredPixels& px, const RenderOptions& opt);

// Float / Double Float Pixel Data (px of 4- or 8-byte IEEE samples): "stored" returns them as
// float32 / float64, "modality" as float32 (no rescale applies), "display" maps the finite
// min/max onto [0, 1] at 16-bit precision (NaN and -inf show as the minimum, +inf as the
// maximum) and then runs render(). Resizing applies to "display" only.
Rendered render_float(const Header& h, const StoredPixels& px, const RenderOptions& opt);

// decode_stored + render (or render_float): what the bindings call for native decoding.
Rendered decode_render(const Dataset& ds, int64_t frame, const RenderOptions& opt);

// Stored output with no second buffer: when `ds` was parsed from the writable bytes `file`
// and its pixels are whole native little-endian frames of 8-, 16- or 32-bit interleaved
// sample words, masks and sign-extends them where they lie (PS3.5 8.1.1), sets r's geometry
// and dtype as render() would (r.data stays empty) and returns their offset in `file`; -1
// when the general path is needed (a resize, one frame of several, big endian, 1-bit, planar
// or 4:2:2 samples, float or deflated data, samples not aligned to their word size). Every
// check of decode_stored runs first, so errors are those of the general path.
int64_t stored_in_place(const Dataset& ds, uint8_t* file, int64_t frame, const RenderOptions& opt, Rendered& r,
                        bool masked = false);

// The display pipeline as a table over the stored bits (Bits Stored <= 16, grey): index with
// (raw >> shift) & mask; values in [0, 1] are exactly what render() computes per pixel. Images
// without a VOI window need the stored value range [lo, hi] (the min/max window).
struct DisplayLut {
  std::vector<float> values;
  int shift = 0;
  uint32_t mask = 0;
  bool needs_range = false;
};
DisplayLut display_lut(const Header& h, bool has_range, int64_t lo, int64_t hi);

// One crop of a batch: a grey image of uint8, uint16 or float32 samples (bytes_per_sample 1,
// 2 or 4; `stride` samples per row), the box (inside the image), whether to mirror it, and
// out_h*out_w floats to write (size*size where out_h and out_w are 0).
struct CropJob {
  const void* src = nullptr;
  ptrdiff_t stride = 0;
  int top = 0, left = 0, height = 0, width = 0;
  bool mirror = false;
  int out_h = 0, out_w = 0;  // output rows and columns; 0: the call's square `size`
  float* out = nullptr;
};
// The AVX2 copy of the crop-resize kernel: GCC on x86-64 only.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CXR_CROP_AVX2 1
#else
#define CXR_CROP_AVX2 0
#endif
// Each box resized to size x size or its job's out_h x out_w (antialiased triangle filter), mirrored where asked, and
// written as value * gain + offset; jobs are spread over num_threads native threads.
void crop_resize_many(const std::vector<CropJob>& jobs, int bytes_per_sample, int size, float gain, float offset,
                      int num_threads);

// A file's bytes, read without zero-filling the buffer first.
struct FileBytes {
  Buffer bytes;
  size_t length = 0;
  bool whole = true;
  const uint8_t* data() const { return bytes.get(); }
  size_t size() const { return length; }
};
// Reads the first max_bytes (default: all) of a file; `whole` says whether that is all of it.
FileBytes read_file(const std::string& path, size_t max_bytes = SIZE_MAX);

// Reads a whole file and parses it (into ds, which points into the bytes). When the header in
// the first 64 KiB shows native little-endian pixel data of aligned 8-, 16- or 32-bit words
// whose stored bits start at bit 0, those words are masked and sign-extended chunk by chunk
// as they arrive, while in cache (PS3.5 8.1.1). Every reader of native pixels masks the same
// way, so the bytes read the same through any path, and stored_in_place skips its own pass
// when `masked`. If the full parse implies other words or another mask than the first 64 KiB
// did, the file is read again as it is on disk (masked = false).
FileBytes read_and_parse(const std::string& path, Dataset& ds, bool& masked);

}  // namespace cxr
