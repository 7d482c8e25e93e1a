// OHIF's own SEG parser (@cornerstonejs/adapters, the version OHIF 3.13.2 ships) run under Node:
// turn a SEG into labelmaps on the given source images and print, per source image, the voxel count
// and centroid (row, column) of every segment value. Usage: node seg_contract.mjs SOURCES.json SEG.dcm
import { readFileSync } from 'node:fs';
import { metaData } from '@cornerstonejs/core';
import { adaptersSEG } from '@cornerstonejs/adapters';

const [sourcesPath, segPath] = process.argv.slice(2);
const sources = JSON.parse(readFileSync(sourcesPath, 'utf8'));
const byId = new Map(sources.map((s) => [s.imageId, s]));

function provide(type, imageId) {
  const s = byId.get(imageId);
  if (!s) return undefined;
  const plane = {
    frameOfReferenceUID: s.frameOfReferenceUID,
    rows: s.rows,
    columns: s.columns,
    imageOrientationPatient: [...s.rowCosines, ...s.columnCosines],
    rowCosines: s.rowCosines,
    columnCosines: s.columnCosines,
    imagePositionPatient: s.imagePositionPatient,
    sliceThickness: s.sliceThickness,
    pixelSpacing: s.pixelSpacing,
    rowPixelSpacing: s.pixelSpacing[0],
    columnPixelSpacing: s.pixelSpacing[1],
  };
  switch (type) {
    case 'imagePlaneModule':
      return plane;
    case 'generalSeriesModule':
      return { seriesInstanceUID: s.seriesInstanceUID, modality: 'MR' };
    case 'generalImageModule':
      return { sopInstanceUID: s.sopInstanceUID, instanceNumber: s.instanceNumber };
    case 'imagePixelModule':
      return {
        samplesPerPixel: 1, photometricInterpretation: 'MONOCHROME2', rows: s.rows, columns: s.columns,
        bitsAllocated: 16, bitsStored: 12, highBit: 11, pixelRepresentation: 0,
      };
    case 'sopCommonModule':
      return { sopClassUID: s.sopClassUID, sopInstanceUID: s.sopInstanceUID };
    case 'instance':
      return {
        SOPInstanceUID: s.sopInstanceUID, SOPClassUID: s.sopClassUID, SeriesInstanceUID: s.seriesInstanceUID,
        FrameOfReferenceUID: s.frameOfReferenceUID, ImagePositionPatient: s.imagePositionPatient,
        ImageOrientationPatient: [...s.rowCosines, ...s.columnCosines], PixelSpacing: s.pixelSpacing,
        Rows: s.rows, Columns: s.columns, InstanceNumber: s.instanceNumber,
      };
    default:
      return undefined;
  }
}
metaData.addProvider(provide, 10000);

const buffer = readFileSync(segPath);
const arrayBuffer = buffer.buffer.slice(buffer.byteOffset, buffer.byteOffset + buffer.byteLength);
const started = performance.now();
const result = await adaptersSEG.Cornerstone3D.Segmentation.createFromDICOMSegBuffer(
  sources.map((s) => s.imageId), arrayBuffer, { metadataProvider: metaData },
);
const elapsedMs = performance.now() - started;
const images = result.labelMapImages.flat();
const perImage = {};
for (const image of images) {
  const data = image.getPixelData ? image.getPixelData() : image.voxelManager.getScalarData();
  const stats = {};
  for (let i = 0; i < data.length; i++) {
    const v = data[i];
    if (v === 0) continue;
    const row = Math.floor(i / image.columns);
    const col = i % image.columns;
    const s = (stats[v] ??= { count: 0, row: 0, column: 0 });
    s.count += 1; s.row += row; s.column += col;
  }
  for (const s of Object.values(stats)) { s.row /= s.count; s.column /= s.count; }
  if (Object.keys(stats).length) perImage[image.referencedImageId] = stats;
}
const segments = Object.fromEntries(
  [...result.segMetadata.data.entries()].filter(([, m]) => m).map(([n, m]) => [n, { label: m.SegmentLabel, rgba: m.rgba }]),
);
process.stdout.write(JSON.stringify({ elapsedMs, labelmapImages: images.length, perImage, segments }));
